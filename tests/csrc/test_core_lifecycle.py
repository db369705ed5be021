"""Retention, preemption by recompute, abort in every state, overlap."""
import numpy as np
import pytest
from core_helpers import Driver, OverlapDriver, i32, make


def run_turn(s, rid, prompt, max_new, session=""):
    s.submit(rid, i32(prompt), max_new, i32([]), session)
    d = Driver(s)
    d.run()
    return d.outputs[rid]


def flood(s, base_rid, n, length):
    for k in range(n):
        run_turn(s, base_rid + k, [base_rid + k * 1000 + i for i in range(length)], 1)


# ------------------------------------------------------------- retention

@pytest.mark.parametrize("session", ["agent-1", ""])
def test_session_pages_survive_pressure_within_ttl(session):
    ps = 4
    s = make(num_pages=24, page_size=ps, session_ttl_s=30.0, max_seq_len=96)
    prompt = list(range(500, 533))  # 33 tokens
    ans = run_turn(s, 1, prompt, 4, session)
    s.set_test_clock(1010.0)  # tool call: 10 s later, others use the pool meanwhile
    flood(s, 100, 3, 60)
    s.check_invariants()
    before = s.stats()["prefix_cache_hit_tokens_total"]
    run_turn(s, 2, prompt + ans + [9, 9], 2, session)
    hit = s.stats()["prefix_cache_hit_tokens_total"] - before
    if session:
        assert hit == (len(prompt) + len(ans) - 1) // ps * ps  # pinned: all kept
    else:
        assert hit < 32  # plain LRU lost them to the flood


def test_session_pin_expires_after_ttl():
    ps = 4
    s = make(num_pages=24, page_size=ps, session_ttl_s=5.0, max_seq_len=96)
    prompt = list(range(500, 533))
    ans = run_turn(s, 1, prompt, 4, "agent")
    assert s.stats()["pages_used"] > 0  # pinned pages count as used
    s.set_test_clock(1006.0)  # past the TTL
    flood(s, 100, 3, 60)
    before = s.stats()["prefix_cache_hit_tokens_total"]
    run_turn(s, 2, prompt + ans + [9], 2, "agent")
    assert s.stats()["prefix_cache_hit_tokens_total"] - before < 32
    s.set_test_clock(2000.0)
    s.plan()  # expiry runs at plan time
    assert s.stats()["pages_used"] == 0


def test_session_ttl_zero_retains_nothing():
    s = make(num_pages=24, page_size=4, session_ttl_s=0.0, max_seq_len=96)
    run_turn(s, 1, list(range(500, 533)), 4, "agent")
    assert s.stats()["pages_used"] == 0  # nothing pinned: the pages are idle cache
    assert s.stats()["pages_cached"] > 0


def test_session_pin_handed_to_next_request_until_admitted():
    ps = 4
    s = make(num_pages=24, page_size=ps, session_ttl_s=5.0, max_seq_len=96, max_running=1)
    prompt = list(range(500, 533))
    ans = run_turn(s, 1, prompt, 4, "agent")  # 9 pages pinned
    s.submit(50, i32(range(700, 750)), 2, i32([]))  # 13 pages, runs first
    s.submit(51, i32(range(800, 850)), 2, i32([]))  # 13 more: must evict 50's idle pages
    s.submit(2, i32(prompt + ans + [9]), 2, i32([]), "agent")  # arrives: pin handed off
    s.set_test_clock(1100.0)  # far past the TTL while it queues behind 50 and 51
    d = Driver(s)
    d.run()
    assert d.finished == {50: "length", 51: "length", 2: "length"}
    # Had the pin expired, turn 1's pages (older than 50's) would have been evicted first.
    assert s.stats()["prefix_cache_hit_tokens_total"] == 36
    assert s.stats()["pages_used"] > 0  # turn 2 is now pinned in its turn
    s.check_invariants()


def _pin_a_turn(s):
    """Session "agent" finishes a 33-token turn: 9 pages pinned, nothing else held."""
    run_turn(s, 1, list(range(500, 533)), 4, "agent")
    assert s.stats()["pages_pinned"] == 9


def test_pins_give_way_to_decodes_before_anyone_is_preempted():
    ps = 4
    # 16 pages beside the pin, taken two at a time: the older decode finds none first
    s = make(num_pages=25, page_size=ps, session_ttl_s=30.0, max_seq_len=96)
    _pin_a_turn(s)
    for rid in (2, 3):   # two decodes that grow to 10 pages each
        s.submit(rid, i32(range(rid * 100, rid * 100 + 8)), 30, i32([]))
    d = Driver(s)
    d.run()
    assert d.finished == {2: "length", 3: "length"}
    assert s.stats()["preemptions_total"] == 0   # the idle session's pin went first
    assert s.stats()["pages_pinned"] == 0


def test_an_admission_takes_pages_from_an_idle_pin():
    ps = 4
    s = make(num_pages=24, page_size=ps, session_ttl_s=30.0, max_seq_len=96)
    _pin_a_turn(s)
    s.submit(2, i32(range(200, 208)), 30, i32([]))
    d = Driver(s)
    d.step(), d.step()
    assert s.state(2) == "decoding"
    s.submit(3, i32(range(300, 356)), 2, i32([]))   # 14 pages: more than the 12 free
    d.step()
    assert s.stats()["pages_pinned"] == 0           # its whole prompt at once
    d.run()
    assert d.finished == {2: "length", 3: "length"}
    assert s.stats()["preemptions_total"] == 0


def test_a_pin_handed_to_a_queued_turn_is_kept_from_admissions():
    ps = 4
    s = make(num_pages=24, page_size=ps, session_ttl_s=30.0, max_seq_len=96)
    prompt = list(range(500, 533))
    ans = run_turn(s, 1, prompt, 4, "agent")           # 9 pages pinned
    s.submit(2, i32(range(200, 208)), 30, i32([]))
    d = Driver(s)
    d.step(), d.step()
    s.submit(3, i32(range(300, 356)), 2, i32([]))      # 14 pages: the 12 free are too few
    s.submit(4, i32(prompt + ans + [9]), 2, i32([]), "agent")   # the pin is handed to it
    d.step()
    assert s.state(3) == "prefilling" and s.stats()["pages_pinned"] == 9
    d.run()
    assert d.finished == {2: "length", 3: "length", 4: "length"}
    assert s.stats()["prefix_cache_hit_tokens_total"] == 36   # turn 4 found all of turn 1


def test_session_pins_with_real_monotonic_clock():
    s = make(session_ttl_s=30.0)
    s.clear_test_clock()
    s.submit(1, i32(range(9)), 1, i32([]), "sess")
    Driver(s).run()
    s.plan()
    assert s.stats()["pages_used"] == 2  # pinned for 30 s of real time
    s.check_invariants()


# ------------------------------------------------------------ preemption

def _greedy_outputs(prompts, max_new, **kw):
    s = make(**kw)
    for rid, pr in prompts.items():
        s.submit(rid, i32(pr), max_new, i32([]))
    d = Driver(s)
    d.run()
    return d, s


def test_preemption_by_recompute_continues_where_it_was():
    prompts = {r: [r * 10 + i for i in range(10)] for r in range(1, 5)}
    big, _ = _greedy_outputs(prompts, 30, num_pages=200, page_size=4, max_seq_len=64)
    small, s = _greedy_outputs(prompts, 30, num_pages=24, page_size=4, max_seq_len=64)
    assert s.stats()["preemptions_total"] > 0
    assert small.finished == {r: "length" for r in prompts}
    assert small.outputs == big.outputs  # same tokens, nothing lost or duplicated
    assert s.stats()["generation_tokens_total"] == 4 * 30
    st = s.stats()
    assert st["pages_used"] == 0


def test_preemption_victim_is_newest():
    s = make(num_pages=10, page_size=4, max_seq_len=40, max_batch_tokens=64)
    s.submit(1, i32(range(8)), 30, i32([]))
    s.submit(2, i32(range(20, 28)), 30, i32([]))
    d = Driver(s)
    seen_preempted = None
    for _ in range(200):
        if d.step() is None:
            break
        if s.state(2) == "preempted" and seen_preempted is None:
            seen_preempted = 2
            assert s.state(1) == "decoding"
    assert seen_preempted == 2
    assert d.finished == {1: "length", 2: "length"}


# ----------------------------------------------------------------- abort

def _assert_clean(s):
    s.check_invariants()
    st = s.stats()
    assert st["pages_used"] == 0
    assert st["requests_running"] == 0 and st["requests_waiting"] == 0
    s.evict_cache()
    assert s.stats()["pages_free"] == st["pages_total"]


def test_abort_unknown_returns_false():
    s = make()
    assert not s.abort(123)


def test_abort_queued():
    s = make()
    s.submit(1, i32([1, 2, 3]), 3, i32([]))
    assert s.state(1) == "queued"
    assert s.abort(1) and s.state(1) == "" and not s.abort(1)
    assert s.plan() is None
    _assert_clean(s)


def test_abort_prefilling_mid_chunk():
    s = make(num_pages=64, page_size=4, max_batch_tokens=8)
    s.submit(1, i32(range(40)), 3, i32([]))
    d = Driver(s)
    d.step()
    assert s.state(1) == "prefilling"
    assert s.abort(1)
    _assert_clean(s)


def test_abort_decoding():
    s = make()
    s.submit(1, i32(range(10)), 30, i32([]))
    d = Driver(s)
    d.step(), d.step()
    assert s.state(1) == "decoding"
    assert s.abort(1)
    assert s.plan() is None
    _assert_clean(s)


def test_abort_preempted():
    s = make(num_pages=10, page_size=4, max_seq_len=40)
    s.submit(1, i32(range(8)), 30, i32([]))
    s.submit(2, i32(range(20, 28)), 30, i32([]))
    d = Driver(s)
    for _ in range(100):
        d.step()
        if s.state(2) == "preempted":
            break
    assert s.state(2) == "preempted"
    assert s.abort(2)
    d.run()
    assert d.finished == {1: "length"}
    _assert_clean(s)


def test_abort_with_step_in_flight_defers_page_release():
    s = make(num_pages=8, page_size=4, max_seq_len=32)
    s.submit(1, i32(range(16)), 5, i32([]))
    p = s.plan()  # in flight, reads 4 pages
    assert s.abort(1)
    s.check_invariants()
    assert s.stats()["pages_free"] == 4  # held until the step commits
    s.submit(2, i32(range(100, 120)), 2, i32([]))
    p2 = s.plan()  # may only use the 4 free pages
    assert p2 is not None
    n2 = -(-int(p2.seq_lens[0]) // 4)
    assert n2 == 4  # only the 4 free pages: the aborted request's stay held
    assert not set(p2.page_table[0, :n2].tolist()) & set(p.page_table[0, :4].tolist())
    assert s.commit(p.step, i32([5]), 0.0) == []  # aborted row: no event
    s.check_invariants()
    d = Driver(s)
    d.handle(s.commit(p2.step, d.sample_plan(p2), 0.0))
    d.run()
    assert d.finished == {2: "length"}
    _assert_clean(s)


# --------------------------------------------------------------- overlap

def test_overlap_uses_placeholders_and_matches_serial_run():
    prompts = {r: [r * 13 + i for i in range(5 + r)] for r in range(1, 6)}

    def run(driver_cls, **kw):
        s = make(num_pages=64, page_size=4, max_batch_tokens=16, **kw)
        for rid, pr in prompts.items():
            s.submit(rid, i32(pr), 12, i32([]))
        d = driver_cls(s)
        for _ in range(1000):
            if d.step() is None:
                break
        return d, s

    serial, _ = run(Driver)
    over, s = run(OverlapDriver)
    assert over.outputs == serial.outputs
    assert any((p.input_ids < 0).any() for p in over.plans)  # placeholders used
    for p, ids in over.resolved:  # every placeholder resolved to the sampled token
        assert (ids >= 0).all()
    assert s.inflight_steps() == 0
    _assert_clean(s)


def test_overlap_finish_releases_pages_only_after_commit():
    s = make(num_pages=4, page_size=4, max_seq_len=16)
    s.submit(1, i32(range(5)), 2, i32([]))
    p0 = s.plan()                 # prefill, samples token 1
    p1 = s.plan()                 # decode with placeholder, samples token 2
    assert p1.input_ids.tolist() == [-1]
    ev = s.commit(p0.step, i32([9]), 0.0)
    assert ev == [(1, 9, "")]
    ev = s.commit(p1.step, i32([10]), 0.0)
    assert ev == [(1, 10, "length")]
    _assert_clean(s)


def test_overlap_stop_mid_flight_wastes_row_but_not_pages():
    s = make(num_pages=6, page_size=4, max_seq_len=24)
    s.submit(1, i32(range(7)), 10, i32([42]))
    p0 = s.plan()
    p1 = s.plan()
    assert s.commit(p0.step, i32([42]), 0.0) == [(1, 42, "stop")]  # finished; p1 in flight
    s.check_invariants()
    in_flight_pages = set(p1.page_table[0, :2].tolist())  # 8 tokens = 2 pages
    assert s.stats()["pages_free"] == 6 - len(in_flight_pages)
    s.submit(2, i32(range(50, 66)), 2, i32([]))
    p2 = s.plan()
    if p2 is not None:
        n = -(-int(p2.seq_lens[0]) // 4)
        assert not set(p2.page_table[0, :n].tolist()) & in_flight_pages
    assert s.commit(p1.step, i32([3]), 0.0) == []  # wasted row, no event
    s.check_invariants()


def test_commit_must_follow_step_order_with_two_in_flight():
    s = make()
    s.submit(1, i32(range(5)), 5, i32([]))
    p0 = s.plan()
    p1 = s.plan()
    with pytest.raises(ValueError, match="out of order"):
        s.commit(p1.step, i32([1]), 0.0)
    s.commit(p0.step, i32([1]), 0.0)
    s.commit(p1.step, i32([1]), 0.0)


def test_abort_after_finish_is_false_and_harmless():
    s = make()
    s.submit(1, i32([1, 2, 3]), 2, i32([]))
    d = Driver(s)
    d.run()
    assert d.finished == {1: "length"}
    assert not s.abort(1)
    _assert_clean(s)
