"""Speculation composes with grammar-constrained decoding: drafts the grammar forbids are cut
before they are verified, every draft's logits row is masked at the grammar state after the
drafts before it, and the output is token for token the output without drafts."""
from __future__ import annotations

import json
import random

import pytest

from appliance.engine.protocol import Constraint, GenerateRequest
from appliance.engine.speculative.speculator import Speculator

from .conftest import FakeRunner, outputs, run_to_end
from .test_constraints import EOS, SCHEMA, VOCAB, eager_to_stop


class OracleDraft:
    """Drafts from a known output: the tokens that follow, with every third draft replaced by
    a random id (often one the grammar forbids, sometimes an allowed wrong one)."""

    def __init__(self, reference: dict[int, list[int]], seed: int) -> None:
        self.reference, self.done = reference, {}
        self.rng = random.Random(seed)

    def start(self, rid, prompt, session):
        self.done[rid] = 0

    def extend(self, rid, tokens):
        self.done[rid] += len(tokens)

    def propose(self, rid, max_draft):
        ahead = self.reference[rid][self.done[rid]:self.done[rid] + max_draft]
        return [self.rng.randrange(VOCAB) if i % 3 == 2 else t for i, t in enumerate(ahead)]

    def finish(self, rid):
        self.done.pop(rid, None)


def constrained(rid: int) -> GenerateRequest:
    return GenerateRequest(rid, [5, 6, 7], max_new_tokens=120, temperature=0.0,
                           constraint=Constraint("json_schema", json.dumps(SCHEMA)))


@pytest.mark.parametrize("seed", [1, 2])
def test_constrained_output_is_the_same_with_drafts(make_engine, tiny_tokenizer_path, seed):
    runner = FakeRunner(VOCAB, eager_to_stop, eos_token_ids=(EOS,))
    plain = make_engine(runner, tiny_tokenizer_path)
    plain._submit(constrained(seed))
    run_to_end(plain)
    expected = [o.token_id for o in outputs(plain, seed)]
    assert outputs(plain, seed)[-1].finish_reason == "stop" and len(expected) > 8

    spec = make_engine(runner, tiny_tokenizer_path, overrides=("speculative.method=ngram",))
    spec.speculator = Speculator(OracleDraft({seed: expected}, seed), max_draft=6)
    spec._submit(constrained(seed))
    run_to_end(spec)
    assert [o.token_id for o in outputs(spec, seed)] == expected
    st = spec.scheduler.stats()
    assert st["spec_accepted_tokens_total"] > 0
    assert st["spec_accepted_tokens_total"] < st["spec_draft_tokens_total"]  # some were wrong
    assert st["pages_used"] == 0


def test_draft_masks_ending_the_grammar_leave_the_matcher_as_it_was(tiny_tokenizer_path):
    """A chain that completes the grammar and then drafts the end of sequence: llguidance takes
    that end without recording it, so the rollback must not count it."""
    from appliance.engine.constraints import Grammars, allows, build_tokenizer, compile_matcher

    tokenizer = build_tokenizer(tiny_tokenizer_path, VOCAB, [EOS])
    schema = Constraint("json_schema", json.dumps({"type": "object", "properties": {},
                                                   "additionalProperties": False}))
    grammars = Grammars(VOCAB)
    grammars.add(1, compile_matcher(tokenizer, schema))
    before, _ = grammars.draft_bitmask(1, [])
    close = [t for t in range(VOCAB) if allows(before[0], t)]
    # '{' opens; whatever closes it, then the end of sequence
    opened = next(t for t in close if tokenizer.decode_str([t]) == "{")
    masks, _ = grammars.draft_bitmask(1, [opened])
    closing = next(t for t in range(VOCAB) if allows(masks[1], t)
                   and tokenizer.decode_str([t]) == "}")
    _, accepted = grammars.draft_bitmask(1, [opened, closing, EOS])
    assert accepted == 3
    after, _ = grammars.draft_bitmask(1, [])
    assert (after[0] == before[0]).all()


class EndingDraft(OracleDraft):
    """The known output's next token, then the end of sequence: a draft the grammar allows
    wherever it may end, and one min_tokens forbids until enough tokens are out."""

    def propose(self, rid, max_draft):
        ahead = self.reference[rid][self.done[rid]:self.done[rid] + max_draft]
        return [EOS if i == 1 else t for i, t in enumerate(ahead)]


def test_min_tokens_holds_the_end_back_at_every_draft(make_engine, tiny_tokenizer_path):
    """The grammar may end after "ok"; the model wants to; min_tokens 16 holds the end back in
    each verify row's mask by that row's position, so the drafted ends before it are rejected
    and the output is the one without drafts (without the hold, the first is accepted)."""
    def request() -> GenerateRequest:
        return GenerateRequest(1, [5, 6, 7], max_new_tokens=40, temperature=0.0, min_tokens=16,
                               constraint=Constraint("lark", 'start: "ok" (" more")*'))
    runner = FakeRunner(VOCAB, eager_to_stop, eos_token_ids=(EOS,))
    plain = make_engine(runner, tiny_tokenizer_path)
    plain._submit(request())
    run_to_end(plain)
    expected = [o.token_id for o in outputs(plain, 1)]
    assert len(expected) > 16 and expected[-1] == EOS and EOS not in expected[:-1]

    spec = make_engine(runner, tiny_tokenizer_path, overrides=("speculative.method=ngram",))
    spec.speculator = Speculator(EndingDraft({1: expected}, 0), max_draft=3)
    spec._submit(request())
    run_to_end(spec)
    assert [o.token_id for o in outputs(spec, 1)] == expected
    st = spec.scheduler.stats()
    assert 0 < st["spec_accepted_tokens_total"] < st["spec_draft_tokens_total"]
