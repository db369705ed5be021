"""SuffixDraft, the suffix-decoding DraftSource: its drafts are continuations that occurred in
the text it indexed, a rewrite of text in the prompt is drafted nearly whole, an agent's next
turn takes over the previous turn's tree, and the global tree and parked trees stay bounded."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.engine.speculative.suffix import SuffixDraft, SuffixParams


def occurs(texts, needle):
    n = len(needle)
    return any(t[i:i + n] == needle for t in texts for i in range(len(t) - n + 1))


def greedy_replay(source, rid, output, k):
    """Accepted tokens per verify step if the target emits `output` (exact for greedy)."""
    accepted_per_step, i = [], 0
    while i < len(output):
        draft = source.propose(rid, k)
        n = 0
        while n < len(draft) and i + n < len(output) and draft[n] == output[i + n]:
            n += 1
        step = output[i:i + n + 1]  # the accepted drafts plus the target's own token
        source.extend(rid, step)
        accepted_per_step.append(len(step))
        i += len(step)
    return accepted_per_step


turn = st.tuples(st.sampled_from(["a", "b", "c"]),                   # conversation
                 st.integers(0, 3),                                    # answer tokens re-tokenized
                 st.lists(st.integers(0, 4), max_size=40),             # new prompt tokens
                 st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3), max_size=12))
SESSION = {"a": "a", "b": "b", "c": ""}  # conversation c sends no session


@settings(max_examples=80, deadline=None)
@given(turns=st.lists(turn, max_size=10), k=st.integers(1, 6))
def test_drafts_occurred_in_the_indexed_text(turns, k):
    """Turns of a few conversations; each resends its conversation's last context (the answer's
    last tokens re-tokenized) plus new tokens. Every draft, with the suffix it matched, occurs in
    some text a tree was given: a request's tree (with what an earlier turn left) or an output."""
    depth = 8
    source = SuffixDraft(SuffixParams(max_depth=depth, global_tokens=60, parked_tokens=200))
    indexed: list[list[int]] = []
    contexts: dict[str, list[int]] = {}
    parked: dict[object, tuple[list[int], list[int]]] = {}  # park key -> (tree text, context)

    def key(session, context):
        return session or tuple(context[:64])

    for rid, (conversation, rewrite, new, chunks) in enumerate(turns):
        session, context = SESSION[conversation], contexts.get(conversation, [])
        prompt = context[:len(context) - rewrite] + [9] * min(rewrite, len(context)) + new
        source.start(rid, prompt, session)
        tree_text, old = parked.pop(key(session, prompt), ([], []))
        if source.indexed_tokens(rid) == len(prompt):  # a fresh tree (or one with no leftover)
            tree_text = list(prompt)
        else:  # the parked tree, extended after the common prefix
            kept = next((i for i, (a, b) in enumerate(zip(old, prompt)) if a != b),
                        min(len(old), len(prompt)))
            tree_text = tree_text + prompt[kept:]
            assert source.indexed_tokens(rid) == len(tree_text)
        indexed.append(tree_text)
        output: list[int] = []
        for chunk in chunks:
            tail = (prompt + output)[-depth:]
            draft = source.draft(rid, k)
            assert draft is not None and len(draft.tokens) <= k
            if draft.tokens:
                assert 1 <= draft.match_len <= len(tail)
                assert occurs(indexed, tail[-draft.match_len:] + draft.tokens)
            source.extend(rid, chunk)
            output += chunk
            tree_text += chunk
        source.finish(rid)
        indexed.append(output)
        contexts[conversation] = prompt + output
        parked[key(session, prompt + output)] = (tree_text, prompt + output)
        assert source.global_tree.num_tokens <= 60 or source.global_tree.num_sequences == 1
        assert source.parked_tokens <= 200


def test_rewrite_of_the_prompt_is_drafted_nearly_whole():
    rng = np.random.default_rng(1)
    file = rng.integers(100, 5000, size=600).tolist()
    instruction = [11, 12, 13]
    answer = list(file)
    answer[300:302] = [7, 8]  # "rename X to Y": a small change
    source = SuffixDraft()
    source.start(1, file + instruction, "")
    steps = greedy_replay(source, 1, answer, k=8)
    mean = len(answer) / len(steps)
    assert mean > 6.0, f"mean accepted length {mean:.2f}"
    assert source.propose(1, 0) == [] and source.propose(99, 8) == []


def test_next_turn_takes_over_the_session_tree():
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 1000, size=5000).tolist()
    output = rng.integers(0, 1000, size=50).tolist()
    source = SuffixDraft()
    source.start(1, prompt, "agent")
    source.extend(1, output)
    source.finish(1)
    assert source.parked_tokens == 5050
    turn2 = prompt + output + [1, 2, 3]
    source.start(2, turn2, "agent")
    assert source.indexed_tokens(2) == len(turn2)  # extended, not rebuilt (nor duplicated)
    assert source.parked_tokens == 0
    # The answer came back re-tokenized: the old tail stays as extra text in the tree.
    source.extend(2, [4, 5])
    source.finish(2)
    turn3 = turn2 + [4, 6] + [7] * 10
    source.start(3, turn3, "agent")
    assert source.indexed_tokens(3) == len(turn2) + 2 + 11
    # A session whose new prompt shares little with its tree gets a fresh one.
    source.finish(3)
    source.start(4, rng.integers(0, 1000, size=300).tolist(), "agent")
    assert source.indexed_tokens(4) == 300
    # Another session's turn never takes it.
    source.finish(4)
    source.start(5, turn3, "other")
    assert source.indexed_tokens(5) == len(turn3)


def test_a_conversation_without_session_is_found_by_its_opening():
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 1000, size=2000).tolist()
    source = SuffixDraft()
    source.start(1, prompt, "")
    source.extend(1, [5, 6])
    source.finish(1)
    source.start(2, prompt + [5, 6, 7], "")
    assert source.indexed_tokens(2) == len(prompt) + 3


def test_outputs_of_finished_requests_draft_for_others():
    source = SuffixDraft()
    answer = list(range(200, 260))
    source.start(1, [1, 2, 3], "")
    source.extend(1, answer)
    source.finish(1)
    source.start(2, [4, 5, 6], "")
    source.extend(2, answer[:10])
    assert source.propose(2, 8) == answer[10:18]


def test_parked_trees_are_bounded():
    source = SuffixDraft(SuffixParams(parked_tokens=1000))
    for i in range(10):
        source.start(i, list(range(i, i + 300)), f"s{i}")
        source.finish(i)
        assert source.parked_tokens <= 1000
    source.start(100, list(range(0, 300)) + [1], "s0")  # dropped long ago: a fresh tree
    assert source.indexed_tokens(100) == 301


def test_unknown_requests():
    source = SuffixDraft()
    source.finish(5)  # nothing to free
    assert source.propose(5, 4) == []
    with pytest.raises(KeyError):
        source.extend(5, [1])


def test_a_long_prompt_is_indexed_off_the_callers_thread():
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, 30000, size=40_000).tolist()
    source = SuffixDraft()
    source.start(1, prompt, "")
    source.extend(1, prompt[100:103])  # accepted while the prompt may still be indexing
    draft = source.propose(1, 8)  # 3 matched tokens: 6 drafted
    assert draft in ([], prompt[103:109])  # nothing until the tree is ready, then the right one
    assert source.indexed_tokens(1) == len(prompt) + 3  # waits; the accepted tokens joined
    assert source.propose(1, 8) == prompt[103:109]
    source.finish(1)
    assert source.global_tree.num_tokens == 3
