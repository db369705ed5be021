"""scripts/spec_acceptance.py: the replay counts verify steps as the verifier would at greedy
(accepted drafts up to the first wrong one, plus the target's own token) and the bound on a
second branch at the first draft, and suffix drafts
on exactly-made edits of this repository's files are nearly all accepted."""
from __future__ import annotations

import pytest

from appliance.config import load_config
from appliance.engine.speculative.suffix import SuffixDraft
from scripts.spec_acceptance import Request, oracle, replay

OUTPUT = list(range(100, 130))


class Scripted:
    """A draft source that proposes `guess(context position)`."""

    def __init__(self, guess):
        self.guess, self.done = guess, 0

    def start(self, rid, prompt, session):
        self.done = 0

    def extend(self, rid, tokens):
        self.done += len(tokens)

    def propose(self, rid, max_draft):
        return self.guess(self.done, max_draft)

    def finish(self, rid):
        pass


@pytest.mark.parametrize("k", [1, 4, 8])
def test_replay_counts_steps_like_greedy_verification(k):
    trace = [Request("s", 0, [1, 2, 3], OUTPUT)]
    right = replay(lambda: Scripted(lambda i, n: OUTPUT[i:i + n]), trace, k)
    assert right["tokens_per_step"] == pytest.approx(len(OUTPUT) / -(-len(OUTPUT) // (k + 1)))
    assert right["acceptance_rate"] == pytest.approx(1.0, abs=0.05)
    assert right["missed_first"] == 0.0
    assert right["tree_bound_tokens_per_step"] == right["tokens_per_step"]
    wrong = replay(lambda: Scripted(lambda i, n: [0] * n), trace, k)
    assert wrong["tokens_per_step"] == 1.0 and wrong["acceptance_rate"] == 0.0
    assert wrong["missed_first"] == 1.0 and wrong["tree_bound_tokens_per_step"] == 1.0 + k
    none = replay(lambda: Scripted(lambda i, n: []), trace, k)
    assert none["tokens_per_step"] == 1.0 and none["drafted_per_step"] == 0.0
    # Right for two tokens, then wrong: every step takes 2 drafts + the target's token.
    half = replay(lambda: Scripted(lambda i, n: (OUTPUT[i:i + 2] + [0] * n)[:n]), trace, 4)
    assert half["tokens_per_step"] == pytest.approx(3.0)
    assert half["missed_first"] == 0.0        # a second first-draft branch would not help


def test_suffix_drafts_on_exact_edits():
    config = load_config(None, ["model.preset=tiny-llama"])  # its tokenizer: no conversion
    trace = oracle(config, users=2, turns=2, seed=0)
    assert [(r.session, r.turn) for r in trace] == [("edit-0", 0), ("edit-0", 1),
                                                    ("edit-1", 0), ("edit-1", 1)]
    assert trace[1].prompt[:len(trace[0].prompt) - 8] == trace[0].prompt[:-8]  # resent chat
    result = replay(SuffixDraft, sorted(trace, key=lambda r: (r.turn, r.session)), 8)
    assert result["tokens_per_step"] > 7.0 and result["acceptance_rate"] > 0.9
