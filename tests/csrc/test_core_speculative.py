"""Speculative verify rows in the scheduler: a decoding request's drafts are planned after its
next token, commit takes the accepted run, rejected drafts' pages return in that same commit,
and the prefix cache never records a draft."""
import numpy as np
import pytest
from core_helpers import i32, make

PS = 4


def decoding(s, rid=1, prompt=range(10, 16), max_new=20, stop=(), more=()):
    """Submit `rid` (and the rids in `more`, same prompt shifted by 100 * rid) and run their
    prefill (steps sample 50 each) until all are decoding with every token committed."""
    for r in (rid, *more):
        s.submit(r, i32([t + 100 * (r != rid) * r for t in prompt]), max_new, i32(list(stop)))
    while not all(s.state(r) == "decoding" for r in (rid, *more)):
        p = s.plan()
        s.commit(p.step, np.full(p.num_rows, 50, np.int32))


def row_tokens(p, rows):
    """tokens for commit: one per logits row (B + total_drafts), from {row: list}."""
    out = []
    for r in range(p.num_rows):
        mine = list(rows.get(r, [0]))
        out += mine + [0] * (1 + int(p.num_draft[r]) - len(mine))
    return i32(out)


def test_a_verify_row_carries_the_next_token_and_its_drafts():
    s = make(page_size=PS)
    decoding(s, 1, more=[2])  # prompt of 6 tokens, then token 50: 7 tokens, 6 with KV
    assert s.set_drafts(1, i32([7, 8, 9])) == 3
    p = s.plan()
    assert p.num_decode == 1 and p.rids.tolist() == [2, 1]  # plain decodes lead
    assert p.num_draft.tolist() == [0, 3] and p.total_drafts == 3
    lo, hi = p.query_start[1], p.query_start[2]
    assert p.input_ids[lo:hi].tolist() == [50, 7, 8, 9]
    assert p.positions[lo:hi].tolist() == [6, 7, 8, 9]
    assert p.prefix_lens[1] == 6 and p.seq_lens[1] == 10
    pages = p.page_table[1]
    assert p.slot_mapping[lo:hi].tolist() == [pages[q // PS] * PS + q % PS for q in range(6, 10)]
    assert s.state(1) == "verifying"
    s.check_invariants()


def test_commit_emits_the_accepted_run_and_returns_rejected_pages():
    s = make(page_size=PS)
    decoding(s, 1, prompt=range(10, 17))  # 7 prompt tokens + 1: KV for 7 (pages 0-1)
    used = s.stats()["pages_used"]
    assert s.set_drafts(1, i32([1, 2, 3, 4, 5, 6])) == 6  # slots 8..13: two more pages
    p = s.plan()
    assert s.stats()["pages_used"] == used + 2
    events = s.commit(p.step, row_tokens(p, {0: [1, 2, 40]}), 0.0, i32([3]))
    assert events == [(1, 1, ""), (1, 2, ""), (1, 40, "")]
    assert s.state(1) == "decoding"
    # KV now covers 10 tokens (3 pages); the page that held only rejected slots is back
    assert s.stats()["pages_used"] == used + 1
    st = s.stats()
    assert (st["spec_draft_tokens_total"], st["spec_accepted_tokens_total"],
            st["spec_verify_rows_total"]) == (6, 2, 1)
    assert st["generation_tokens_total"] == 4
    s.check_invariants()
    p = s.plan()  # the next decode reads the bonus token, at position 10
    assert p.num_decode == 1 and p.input_ids.tolist() == [40] and p.positions.tolist() == [10]


def test_a_stop_id_inside_the_accepted_run_ends_it():
    s = make(page_size=PS)
    decoding(s, 1, stop=[99])
    s.set_drafts(1, i32([5, 99, 6]))
    p = s.plan()
    events = s.commit(p.step, row_tokens(p, {0: [5, 99, 6, 7]}), 0.0, i32([4]))
    assert events == [(1, 5, ""), (1, 99, "stop")]
    assert s.state(1) == ""
    s.check_invariants()
    assert s.stats()["pages_used"] == 0


def test_drafts_stop_at_max_new_tokens():
    s = make(page_size=PS)
    decoding(s, 1, max_new=4)        # 1 generated, 3 to go: the next token + 2 drafts
    assert s.set_drafts(1, i32([1, 2, 3, 4, 5])) == 2
    p = s.plan()
    events = s.commit(p.step, row_tokens(p, {0: [1, 2, 9]}), 0.0, i32([3]))
    assert [e[2] for e in events] == ["", "", "length"]
    s.check_invariants()


def test_drafts_are_refused_until_the_previous_token_is_committed():
    s = make(page_size=PS)
    s.submit(1, i32(range(10, 16)), 20, i32([]))
    assert s.set_drafts(1, i32([1])) == 0        # queued
    p = s.plan()
    assert s.set_drafts(1, i32([1])) == 0        # its first token is still in flight
    s.commit(p.step, i32([5]))
    assert s.set_drafts(1, i32([1, 2])) == 2
    assert s.set_drafts(7, i32([1])) == 0        # unknown rid
    with pytest.raises(ValueError, match="draft token ids"):
        s.set_drafts(1, i32([-1]))


def test_bad_verify_commits_are_refused_before_anything_changes():
    s = make(page_size=PS)
    decoding(s, 1)
    s.set_drafts(1, i32([7, 8]))
    p = s.plan()
    with pytest.raises(ValueError, match="differs from its draft"):
        s.commit(p.step, row_tokens(p, {0: [7, 9, 1]}), 0.0, i32([3]))
    with pytest.raises(ValueError, match="can emit 1 to 3"):
        s.commit(p.step, row_tokens(p, {0: [7, 8, 1]}), 0.0, i32([4]))
    with pytest.raises(ValueError, match="expected 3"):
        s.commit(p.step, i32([7]), 0.0, i32([1]))
    with pytest.raises(ValueError, match="counts"):
        s.commit(p.step, row_tokens(p, {0: [7]}), 0.0, i32([1, 1]))
    s.check_invariants()
    assert s.commit(p.step, row_tokens(p, {0: [3]}))  == [(1, 3, "")]  # no counts: 1 each
    s.check_invariants()


def test_abort_during_a_verify_step_returns_every_page():
    s = make(num_pages=16, page_size=PS)
    decoding(s, 1, prompt=range(10, 19))
    s.set_drafts(1, i32([1, 2, 3, 4, 5, 6, 7]))
    p = s.plan()
    assert s.abort(1)
    s.check_invariants()
    assert s.stats()["pages_used"] > 0           # the step in flight still reads them
    assert s.commit(p.step, row_tokens(p, {0: [1, 2, 3]}), 0.0, i32([3])) == []
    s.check_invariants()
    st = s.stats()
    assert st["pages_used"] == 0 and st["spec_verify_rows_total"] == 0
    s.evict_cache()
    assert s.stats()["pages_free"] == 16


def test_preemption_during_a_verify_step_keeps_the_accepted_tokens():
    # rid 1 verifies in step N; planning N+1 before N commits (overlap), the older rid 2
    # needs a page: the verifying rid 1 is preempted, its verified run still arrives with
    # N's commit, and it resumes from its tokens.
    s = make(num_pages=7, page_size=PS, max_running=4)
    s.submit(2, i32(range(30, 41)), 10, i32([]))       # 11 tokens: 3 pages
    s.submit(1, i32(range(10, 19)), 10, i32([]))       # 9 tokens: 3 pages
    p = s.plan()
    s.commit(p.step, i32([50, 50]))
    assert s.set_drafts(1, i32([1, 2, 3, 4, 5, 6])) == 6   # slots 10..15: the last page
    p1 = s.plan()
    assert p1.rids.tolist() == [2, 1] and p1.num_draft.tolist() == [0, 6]
    assert s.plan() is None                             # rid 2 waits for rid 1's pages
    assert s.state(1) == "preempted" and s.stats()["preemptions_total"] == 1
    s.check_invariants()
    events = s.commit(p1.step, row_tokens(p1, {0: [60], 1: [1, 2, 70]}), 0.0, i32([1, 3]))
    assert events == [(2, 60, ""), (1, 1, ""), (1, 2, ""), (1, 70, "")]
    s.check_invariants()
    p3 = s.plan()
    assert p3.rids.tolist() == [2, 1] and p3.num_decode == 1
    row = slice(p3.query_start[1], p3.query_start[2])
    tokens = list(range(10, 19)) + [50, 1, 2, 70]              # recomputed from its tokens
    assert p3.input_ids[row].tolist() == tokens[p3.prefix_lens[1]:p3.seq_lens[1]]
    s.commit(p3.step, i32([61, 71]))
    s.check_invariants()


def test_drafts_never_take_another_decode_s_budget():
    s = make(page_size=PS, max_batch_tokens=6, max_running=8)
    decoding(s, 1, more=[2, 3, 4])
    for rid in range(1, 5):
        s.set_drafts(rid, i32([1, 2, 3, 4]))
    p = s.plan()
    assert sorted(p.rids.tolist()) == [1, 2, 3, 4]   # every request still decodes
    assert p.num_tokens == 6 and p.total_drafts == 2


def test_drafts_never_preempt():
    s = make(num_pages=6, page_size=PS, max_running=4)
    # 6 prompt tokens + 1: 2 pages each, the pool is full
    decoding(s, 1, prompt=range(10, 16), max_new=8, more=[2, 3])
    s.evict_cache()
    s.set_drafts(2, i32([1, 2, 3, 4, 5]))    # would need a page: none free
    p = s.plan()
    assert sorted(p.rids.tolist()) == [1, 2, 3]
    assert p.num_draft[p.rids.tolist().index(2)] == 1   # what its own page still holds
    assert s.stats()["preemptions_total"] == 0


def test_the_prefix_cache_never_records_a_draft():
    s = make(page_size=PS, session_ttl_s=0.0)
    decoding(s, 1, prompt=range(10, 17))                    # 7 + token 50 -> KV of 7
    s.set_drafts(1, i32([1, 2, 3, 4, 5, 6, 7, 8]))          # would fill pages 2 and 3
    p = s.plan()
    s.commit(p.step, row_tokens(p, {0: [99]}), 0.0, i32([1]))   # every draft rejected
    s.abort(1)
    # a prompt equal to the committed tokens followed by the drafts: only committed full
    # pages may match (8 tokens: 2 pages); the drafts' slots hold no reusable KV
    s.submit(3, i32(list(range(10, 17)) + [50, 99] + [2, 3, 4, 5, 6, 7, 8]), 4, i32([]))
    s.plan()
    assert s.stats()["prefix_cache_hit_tokens_total"] == 8


def test_verify_steps_teach_the_cost_model_the_draft_coefficient():
    # a machine where a draft token costs 8x the prior's guess: the fit finds it
    s = make(num_pages=2048, page_size=16, max_batch_tokens=256, max_running=32,
             max_seq_len=4096)
    rng = np.random.default_rng(0)
    decoding(s, 0, prompt=range(40), max_new=3000, more=range(1, 8))
    for _ in range(200):
        for rid in range(8):
            s.set_drafts(rid, i32(rng.integers(1, 9, size=rng.integers(0, 8))))
        p = s.plan()
        t = 0.002 + 0.0003 * p.num_rows + 0.0004 * p.total_drafts + 1e-7 * p.seq_lens.sum()
        s.commit(p.step, np.full(p.num_rows + p.total_drafts, 60, np.int32), t)
    a, b, c, d, e, f, g = s.cost_coeffs()
    assert abs(e - 0.0004) / 0.0004 < 0.25, s.cost_coeffs()   # the prior said 0.00005
    for rid in range(8):
        s.set_drafts(rid, i32([1] * 7))
    p = s.plan()
    truth = 0.002 + 0.0003 * p.num_rows + 0.0004 * p.total_drafts + 1e-7 * p.seq_lens.sum()
    assert p.total_drafts == 56 and abs(p.predicted_time_s - truth) / truth < 0.1
