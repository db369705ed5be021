"""plan/commit/submit/abort/stats through the binding: the §1 contract."""
import numpy as np
import pytest
from core_helpers import Driver, _core, i32, make

STATS_KEYS = {"pages_total", "pages_used", "pages_cached", "pages_free", "requests_running",
              "requests_waiting", "prompt_tokens_total", "prefix_cache_hit_tokens_total",
              "generation_tokens_total", "preemptions_total", "steps_total", "pages_pinned",
              "spec_draft_tokens_total", "spec_accepted_tokens_total", "spec_verify_rows_total"}


def test_interfaces_example_config_works():
    cfg = _core.SchedulerConfig(num_pages=512, page_size=16, max_batch_tokens=2048,
                                max_running=256, tps_floor=70.0, session_ttl_s=60.0,
                                max_seq_len=131072)
    assert cfg.min_prefill_chunk > 0  # the internal knob keeps its C++ default
    s = _core.Scheduler(cfg)
    assert s.plan() is None
    assert set(s.stats()) == STATS_KEYS


SETTINGS = dict(num_pages=8, page_size=4, max_batch_tokens=64, max_running=4, tps_floor=70.0,
                session_ttl_s=60.0, max_seq_len=32)


@pytest.mark.parametrize("missing", sorted(SETTINGS))
def test_config_has_no_second_defaults(missing):
    # Every setting comes from appliance/config.py; the binding has no fallback of its own.
    with pytest.raises(TypeError):
        _core.SchedulerConfig(**{k: v for k, v in SETTINGS.items() if k != missing})


@pytest.mark.parametrize("key, value", [("page_size", 0), ("num_pages", 0),
                                        ("max_batch_tokens", 0), ("max_running", -1),
                                        ("tps_floor", -1.0), ("tps_floor", float("nan")),
                                        ("session_ttl_s", -0.5), ("max_seq_len", 0),
                                        ("min_prefill_chunk", 0)])
def test_config_rejects_bad_values(key, value):
    with pytest.raises(ValueError, match=key):
        _core.SchedulerConfig(**{**SETTINGS, key: value})


def test_config_zero_floor_and_ttl_mean_off():
    cfg = _core.SchedulerConfig(**{**SETTINGS, "tps_floor": 0.0, "session_ttl_s": 0.0})
    assert cfg.tps_floor == 0.0 and cfg.session_ttl_s == 0.0


def test_single_request_plan_layout():
    s = make(page_size=4)
    s.submit(7, i32(range(10, 20)), 3, i32([]))
    p = s.plan()
    assert p.step == 0 and p.num_decode == 0 and p.num_rows == 1
    assert p.rids.dtype == np.int64 and p.input_ids.dtype == np.int32
    assert p.rids.tolist() == [7]
    assert p.input_ids.tolist() == list(range(10, 20))
    assert p.positions.tolist() == list(range(10))
    assert p.query_start.tolist() == [0, 10]
    assert p.prefix_lens.tolist() == [0] and p.seq_lens.tolist() == [10]
    assert p.sample.tolist() == [1]
    assert p.page_table.shape[0] == 1 and p.page_table.shape[1] >= 3
    assert p.page_table.flags.c_contiguous
    assert (p.page_table[0, 3:] == 0).all()  # padding
    pages = p.page_table[0, :3]
    assert len(set(pages.tolist())) == 3
    expect = [int(pages[pos // 4]) * 4 + pos % 4 for pos in range(10)]
    assert p.slot_mapping.tolist() == expect
    ev = s.commit(p.step, i32([55]), 0.01)
    assert ev == [(7, 55, "")]
    p2 = s.plan()
    assert p2.num_decode == 1 and p2.input_ids.tolist() == [55]
    assert p2.positions.tolist() == [10] and p2.prefix_lens.tolist() == [10]
    assert p2.seq_lens.tolist() == [11]
    assert p2.page_table[0, :3].tolist() == pages.tolist()  # same pages, 11 tokens fit in 3
    assert p2.slot_mapping.tolist() == [int(pages[2]) * 4 + 2]
    s.check_invariants()


def test_length_and_stop_finish():
    s = make()
    s.submit(1, i32([1, 2, 3]), 4, i32([99]))
    s.submit(2, i32([4, 5, 6]), 2, i32([]))
    d = Driver(s, sampler=lambda rid, pos: 99 if (rid == 1 and pos == 5) else 5)
    d.run()
    assert d.finished == {1: "stop", 2: "length"}
    assert d.outputs[1] == [5, 5, 99]
    assert d.outputs[2] == [5, 5]
    st = s.stats()
    assert st["generation_tokens_total"] == 5
    assert st["prompt_tokens_total"] == 6
    assert st["requests_running"] == 0 and st["requests_waiting"] == 0
    assert st["pages_used"] == 0
    assert st["pages_used"] + st["pages_cached"] + st["pages_free"] == st["pages_total"]


def test_submit_validation_messages():
    s = make(num_pages=8, page_size=4, max_seq_len=100)
    with pytest.raises(ValueError, match="empty"):
        s.submit(1, i32([]), 4, i32([]))
    with pytest.raises(ValueError, match="max_seq_len"):
        s.submit(1, i32(range(90)), 20, i32([]))
    with pytest.raises(ValueError, match="KV pages"):
        s.submit(1, i32(range(30)), 10, i32([]))  # 40 tokens = 10 pages > 8
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.submit(1, i32([1]), 0, i32([]))
    with pytest.raises(ValueError, match=">= 0"):
        s.submit(1, i32([1, -3]), 1, i32([]))
    s.submit(1, i32([1, 2]), 2, i32([]))
    with pytest.raises(ValueError, match="duplicate rid 1"):
        s.submit(1, i32([1, 2]), 2, i32([]))
    assert s.stats()["requests_waiting"] == 1


def test_rid_reusable_after_finish():
    s = make()
    s.submit(1, i32([1, 2]), 1, i32([]))
    Driver(s).run()
    s.submit(1, i32([1, 2]), 1, i32([]))
    d = Driver(s)
    d.run()
    assert d.finished == {1: "length"}


def test_commit_out_of_order_and_wrong_length():
    s = make()
    s.submit(1, i32([1, 2, 3]), 3, i32([]))
    p = s.plan()
    with pytest.raises(ValueError, match="out of order"):
        s.commit(p.step + 1, i32([1]), 0.0)
    with pytest.raises(ValueError, match="tokens"):
        s.commit(p.step, i32([1, 2]), 0.0)
    assert s.commit(p.step, i32([1]), 0.0) == [(1, 1, "")]
    with pytest.raises(ValueError, match="out of order"):
        s.commit(p.step, i32([1]), 0.0)


def test_decode_first_and_chunked_prefill_under_budget():
    s = make(num_pages=256, page_size=4, max_batch_tokens=32)
    s.submit(1, i32(range(8)), 50, i32([]))
    d = Driver(s)
    d.step()  # prefill of 1
    s.submit(2, i32(range(100, 200)), 5, i32([]))  # 100-token prompt
    chunks = []
    while True:
        p = d.step()
        assert p.num_tokens <= 32
        assert p.num_decode >= 1 and int(p.rids[0]) == 1  # decode row first
        assert np.all(p.seq_lens[: p.num_decode] - p.prefix_lens[: p.num_decode] == 1)
        rows = list(p.rids[p.num_decode:])
        if 2 in rows:
            b = rows.index(2) + p.num_decode
            chunks.append((int(p.prefix_lens[b]), int(p.seq_lens[b]), int(p.sample[b])))
        if chunks and chunks[-1][2] == 1:
            break
    assert len(chunks) >= 4  # 100 tokens under a 32-token budget shared with a decode
    assert chunks[0][0] == 0 and chunks[-1][1] == 100
    for (a0, a1, _), (b0, _, _) in zip(chunks, chunks[1:]):
        assert a1 == b0  # contiguous chunk cursor
    assert all(c[2] == 0 for c in chunks[:-1])


def test_max_running_limits_admission():
    s = make(max_running=2)
    for r in range(4):
        s.submit(r, i32([1, 2, 3]), 3, i32([]))
    p = s.plan()
    assert p.num_rows == 2
    st = s.stats()
    assert st["requests_running"] == 2 and st["requests_waiting"] == 2
    d = Driver(s)
    d.handle(s.commit(p.step, d.sample_plan(p), 0.0))
    d.run()
    assert set(d.finished) == {0, 1, 2, 3}


def test_steps_total_counts_commits():
    s = make()
    s.submit(1, i32([1, 2, 3]), 2, i32([]))
    Driver(s).run()
    assert s.stats()["steps_total"] == 2


def test_page_tables_of_held_plans_never_change():
    # page_table buffers are reused in place only once Python dropped them.
    s = make(num_pages=256, page_size=4, max_batch_tokens=64)
    for r in range(6):
        s.submit(r, i32(range(r * 10, r * 10 + 7 + r)), 20, i32([]))
    held = []
    d = Driver(s)
    for i in range(40):
        p = d.step()
        if p is None:
            break
        if i % 3 == 0:
            held.append((p, p.page_table.copy()))
        if i == 10:
            assert s.abort(2)
            s.submit(100, i32(range(500, 530)), 10, i32([]))
    for p, snapshot in held:
        assert (p.page_table == snapshot).all()
        for b in range(p.num_rows):
            n = -(-int(p.seq_lens[b]) // 4)
            assert (p.page_table[b, n:] == 0).all()
