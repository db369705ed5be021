"""Prefix reuse across turns, sharing, LRU eviction, aborted requests' pages."""
import numpy as np
from core_helpers import Driver, i32, make


def run_turn(s, rid, prompt, max_new, session=""):
    s.submit(rid, i32(prompt), max_new, i32([]), session)
    d = Driver(s)
    d.run()
    return d.outputs[rid]


def test_second_turn_reuses_every_full_page_of_first():
    ps = 4
    s = make(num_pages=128, page_size=ps)
    p1 = list(range(100, 137))  # 37 tokens
    a1 = run_turn(s, 1, p1, 10)
    assert len(a1) == 10
    turn1 = p1 + a1  # 47 tokens; the last one was sampled, never fed
    assert s.stats()["prefix_cache_hit_tokens_total"] == 0
    p2 = turn1 + [7, 8, 9, 10, 11]
    s.submit(2, i32(p2), 3, i32([]))
    p = s.plan()
    assert p.prefix_lens.tolist() == [(len(turn1) // ps) * ps]  # 44: all full pages of turn 1
    assert s.stats()["prefix_cache_hit_tokens_total"] == 44
    s.commit(p.step, i32([1]), 0.0)
    Driver(s).run()
    s.check_invariants()


def test_multi_turn_conversation_hits_grow():
    ps = 8
    s = make(num_pages=256, page_size=ps, max_batch_tokens=64)
    history = list(range(1, 30))
    for turn in range(5):
        before = s.stats()["prefix_cache_hit_tokens_total"]
        ans = run_turn(s, 10 + turn, history, 6)
        hit = s.stats()["prefix_cache_hit_tokens_total"] - before
        if turn > 0:
            assert hit == (prev_len - 1) // ps * ps  # every computed full page of the last turn
        prev_len = len(history) + len(ans)
        history = history + ans + [3 + turn] * 5


def test_concurrent_requests_share_cached_prefix_pages():
    s = make(num_pages=64, page_size=4)
    sys_prompt = list(range(50, 66))  # 4 full pages
    run_turn(s, 1, sys_prompt + [1, 2], 2)
    s.submit(2, i32(sys_prompt + [3, 4, 5]), 3, i32([]))
    s.submit(3, i32(sys_prompt + [6]), 3, i32([]))
    p = s.plan()
    assert p.prefix_lens.tolist() == [16, 16]
    assert p.page_table[0, :4].tolist() == p.page_table[1, :4].tolist()
    s.check_invariants()
    d = Driver(s)
    d.handle(s.commit(p.step, d.sample_plan(p), 0.0))
    d.run()
    assert s.stats()["pages_used"] == 0


def test_lru_eviction_frees_pool_for_new_work():
    s = make(num_pages=16, page_size=4, max_seq_len=64)
    # Fill the cache with idle pages from several finished requests.
    for r in range(4):
        run_turn(s, r, [r * 100 + i for i in range(13)], 1)
    st = s.stats()
    assert st["pages_cached"] >= 12 and st["pages_used"] == 0
    # A request needing 12 pages must evict (oldest first) rather than wait.
    out = run_turn(s, 99, list(range(1000, 1040)), 4)
    assert len(out) == 4
    # Most recent cached request (r=3) survives longest: its prompt still hits.
    s.check_invariants()


def test_lru_order_oldest_evicted_first():
    s = make(num_pages=12, page_size=4, max_seq_len=64)
    a = [1] * 4 + [2] * 4 + [3]
    b = [4] * 4 + [5] * 4 + [6]
    run_turn(s, 1, a, 1)  # caches 2 pages
    run_turn(s, 2, b, 1)  # caches 2 pages
    run_turn(s, 3, a, 1)  # touches a's pages: b is now least recently used
    # Needs 10 of 12 pages: 8 free + must evict 2 -> b's.
    run_turn(s, 4, list(range(200, 237)), 3)
    before = s.stats()["prefix_cache_hit_tokens_total"]
    run_turn(s, 5, a, 1)
    assert s.stats()["prefix_cache_hit_tokens_total"] - before == 8


def test_evict_cache_empties_pool():
    s = make(num_pages=32, page_size=4)
    run_turn(s, 1, list(range(30)), 5)
    assert s.stats()["pages_cached"] > 0
    n = s.evict_cache()
    st = s.stats()
    assert n > 0 and st["pages_cached"] == 0 and st["pages_free"] == st["pages_total"]
    s.check_invariants()


def test_aborted_request_pages_stay_reusable():
    ps = 4
    s = make(num_pages=64, page_size=ps, max_batch_tokens=64)
    prompt = list(range(300, 341))  # 41 tokens
    s.submit(1, i32(prompt), 20, i32([]))
    d = Driver(s)
    for _ in range(4):
        d.step()  # prefill + 3 decodes
    assert s.abort(1)  # client disconnected
    s.check_invariants()
    assert s.stats()["pages_used"] == 0 and s.stats()["pages_cached"] > 0
    known = prompt + d.outputs[1]  # 44 tokens, 43 fed
    s.submit(2, i32(known + [1, 2]), 2, i32([]))
    p = s.plan()
    assert p.prefix_lens.tolist() == [(len(known) - 1) // ps * ps]


def test_prompt_pages_shared_while_first_request_still_decodes():
    # Agent fan-out: a sub-agent with the same long context arrives while the
    # first request is decoding; the first's prompt pages are already cached.
    ps = 4
    s = make(num_pages=64, page_size=ps, max_batch_tokens=64)
    ctx = list(range(400, 430))  # 30 tokens: 7 full pages
    s.submit(1, i32(ctx + [1]), 20, i32([]))
    d = Driver(s)
    d.step()  # prefill of 1 (committed)
    assert s.state(1) == "decoding"
    s.submit(2, i32(ctx + [2, 3]), 2, i32([]))
    p = d.step()
    row = list(p.rids).index(2)
    assert p.prefix_lens[row] == 28
    assert (p.page_table[row, :7] == p.page_table[list(p.rids).index(1), :7]).all()
    d.run()
    assert s.stats()["pages_used"] == 0


def test_cached_tokens_reports_each_requests_prefix_hit():
    """cached_tokens(rid): None until admitted, then the prompt tokens the prefix cache gave
    that request at its first admission, which is what the hit counter moved by."""
    ps = 4
    s = make(num_pages=128, page_size=ps)
    p1 = list(range(100, 137))
    a1 = run_turn(s, 1, p1, 10)
    assert s.cached_tokens(1) is None  # finished: forgotten
    s.submit(2, i32(p1 + a1 + [7, 8]), 3, i32([]))
    assert s.cached_tokens(2) is None  # queued
    before = s.stats()["prefix_cache_hit_tokens_total"]
    p = s.plan()
    hit = s.stats()["prefix_cache_hit_tokens_total"] - before
    assert hit == 44 and s.cached_tokens(2) == hit == p.prefix_lens[0]
    s.submit(3, i32(range(900, 920)), 2, i32([]))  # a prompt nobody computed
    s.commit(p.step, i32([1]), 0.0)
    p = s.plan()
    assert s.cached_tokens(3) == 0 and s.cached_tokens(2) == 44
    s.commit(p.step, i32([1] * p.num_rows), 0.0)
    Driver(s).run()
    assert s.cached_tokens(99) is None


def test_requests_that_prefilled_one_system_prompt_at_once_both_cache_their_turn():
    """Two agents admitted together share a system prompt neither found cached: each computes
    its own copy. The second to be cached finds the first's system pages: its later pages must
    still be recorded (under the cached ones), or its next turn hits only the system prompt."""
    ps = 4
    s = make(num_pages=256, page_size=ps, max_batch_tokens=256)
    system = list(range(500, 520))                       # 5 pages, shared
    a, b = system + list(range(100, 140)), system + list(range(200, 260))
    s.submit(1, i32(a), 6, i32([]))
    s.submit(2, i32(b), 6, i32([]))
    d = Driver(s)
    d.run()
    s.check_invariants()
    for rid, prompt, nxt in ((3, a, 1), (4, b, 2)):
        turn = prompt + d.outputs[nxt] + [7, 8, 9]
        before = s.stats()["prefix_cache_hit_tokens_total"]
        s.submit(rid, i32(turn), 2, i32([]))
        Driver(s).run()
        hit = s.stats()["prefix_cache_hit_tokens_total"] - before
        assert hit == (len(prompt) + len(d.outputs[nxt]) - 1) // ps * ps, (rid, hit)
        s.check_invariants()
    assert s.evict_cache() > 0 and s.stats()["pages_cached"] == 0  # every page evictable at rest
    s.check_invariants()
