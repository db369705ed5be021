"""MTPDraft's host side: a chain is proposed only while it continues the committed context,
which token follows each token of a plan (sampled, or the prompt's next), how far the next
pass chains."""
from __future__ import annotations

import numpy as np

from appliance.engine.plan_arrays import PlanArrays
from appliance.engine.speculative.mtp import MTPDraft
from appliance.engine.verify import LogitLayout


def _plan(rows: list[tuple[list[int], int, int, int]]) -> PlanArrays:
    """rows: (input ids, first position, sample, drafts)."""
    ids = [t for r in rows for t in r[0]]
    pos = [r[1] + i for r in rows for i in range(len(r[0]))]
    qs = np.cumsum([0] + [len(r[0]) for r in rows])
    i32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
    return PlanArrays(step=1, num_decode=0, input_ids=i32(ids), positions=i32(pos),
                      query_start=i32(qs), prefix_lens=i32([r[1] for r in rows]),
                      seq_lens=i32([r[1] + len(r[0]) for r in rows]), slot_mapping=i32(pos),
                      sample=i32([r[2] for r in rows]), num_draft=i32([r[3] for r in rows]),
                      page_table=np.zeros((len(rows), 4), np.int32))


def test_a_chain_is_proposed_while_it_continues_the_context():
    src = MTPDraft(max_draft=4)
    src.start(1, [1, 2, 3], "")
    src.offer(np.array([1]), np.array([[4, 2, 7, 8, 9]], np.int32))  # 2 valid drafts
    assert src.propose(1, 3) == []          # made for a context of 4 tokens: not yet
    src.extend(1, [5])
    assert src.propose(1, 3) == [7, 8] and src.propose(1, 1) == [7]
    src.extend(1, [7])
    assert src.propose(1, 3) == []          # stale
    src.finish(1)
    assert src.propose(1, 3) == []


def test_the_next_pass_chains_as_far_as_proposals_asked():
    src = MTPDraft(max_draft=8)
    assert src.depth == 8
    src.start(1, [1], "")
    src.propose(1, 3)
    src.offer(np.array([1]), np.zeros((1, 3), np.int32))
    assert src.depth == 3
    src.offer(np.array([1]), np.zeros((1, 3), np.int32))  # nobody asked: the first draft only
    assert src.depth == 1


def test_which_token_follows_each_token():
    src = MTPDraft()
    src.start(7, [10, 11, 12, 13, 14, 15], "")
    src.start(8, [20, 21], "")
    # request 7: a prefill chunk of positions 0..2 (the prompt goes on); request 8: a verify
    # row at position 2 with two drafts
    arrays = _plan([([10, 11, 12], 0, 0, 0), ([30, 31, 32], 2, 1, 2)])
    layout = LogitLayout.of(arrays)
    f = src.following(np.array([7, 8]), arrays, layout)
    assert f.known.tolist() == [-1, -1, 13, -1, -1, -1]  # the prompt's next token
    # the verify row's tokens are followed by what the target samples at them (logits rows)
    assert f.take.tolist() == [-1, -1, -1, 1, 2, 3]
    plain = _plan([([10, 11, 12], 0, 0, 0), ([32], 4, 1, 0)])
    f = src.following(np.array([7, 8]), plain, None)
    assert f.take.tolist() == [-1, -1, -1, 1] and f.known.tolist() == [-1, -1, 13, -1]
