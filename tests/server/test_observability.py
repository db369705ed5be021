"""`/metrics` (Prometheus names per DESIGN) and `/stats` (INTERFACES §5) with live requests."""

from __future__ import annotations

import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MODEL, wait_until

GAUGES = ["kv_pages_total", "kv_pages_used", "kv_pages_cached", "requests_running", "requests_waiting"]
COUNTERS = ["prompt_tokens", "prefix_cache_hit_tokens", "generation_tokens", "preemptions",
            "kernel_compiles", "kernel_compile_seconds"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds"]


def _families(http: httpx.Client) -> dict:
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def _value(family, suffix: str = "") -> float:
    return next(s.value for s in family.samples if s.name == family.name + suffix)


def test_metrics_names_types_and_values(served):
    with served.http() as http:
        http.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 5})
        before = _families(http)
        http.post("/v1/completions", json={"prompt": "one more", "max_tokens": 5})
        after = _families(http)
    for name in GAUGES:
        assert before["tokenspeed_" + name].type == "gauge"
    for name in COUNTERS:
        assert after["tokenspeed_" + name].type == "counter"
    for name in HISTOGRAMS:
        assert after["tokenspeed_" + name].type == "histogram"
    assert _value(after["tokenspeed_kv_pages_total"]) == 512
    engine = served.fake.stats()
    assert _value(after["tokenspeed_generation_tokens"], "_total") == engine["generation_tokens_total"]
    assert _value(after["tokenspeed_prompt_tokens"], "_total") == engine["prompt_tokens_total"]
    ttft = "tokenspeed_time_to_first_token_seconds"
    assert _value(after[ttft], "_count") == _value(before[ttft], "_count") + 1
    itl = "tokenspeed_inter_token_latency_seconds"
    assert _value(after[itl], "_count") == _value(before[itl], "_count") + 4


def test_speculative_figures(served):
    spec = {"spec_draft_tokens_total": 12, "spec_accepted_tokens_total": 9,
            "spec_verify_rows_total": 4, "spec_gate_paused_steps": 32}
    served.fake.totals.update(spec)
    try:
        with served.http() as http:
            families = _families(http)
            stats = http.get("/stats").json()
    finally:
        served.fake.totals.update(dict.fromkeys(spec, 0))
    assert _value(families["tokenspeed_spec_draft_tokens"], "_total") == 12
    assert _value(families["tokenspeed_spec_accepted_tokens"], "_total") == 9
    assert _value(families["tokenspeed_spec_gate_paused_steps"]) == 32
    assert stats["speculative"] == {"draft_tokens": 12, "accepted_tokens": 9, "verify_rows": 4,
                                    "acceptance_rate": 0.75, "mean_accepted_length": 3.25,
                                    "paused_steps": 32}


def test_stats_schema_and_live_request(served):
    served.fake.reply = "tok " * 100
    served.fake.delay_s = 0.02
    done = threading.Event()

    def run() -> None:
        with served.http() as http:
            http.post("/v1/chat/completions", headers={"x-tokenspeed-user": "carol"},
                      json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 60})
        done.set()

    threading.Thread(target=run).start()
    with served.uds() as uds:
        assert wait_until(lambda: any(a["generated_tokens"] >= 10 for a in uds.get("/stats").json()["active"]))
        stats = uds.get("/stats").json()
    assert set(stats) == {"model", "uptime_s", "engine", "device", "tp_size", "tps_floor", "kv", "requests",
                          "throughput", "prefix_cache", "speculative", "totals", "history", "gpus", "active",
                          "users", "step_time"}
    assert stats["step_time"] is None  # the fake engine runs no steps (the real one: test_daemon_e2e)
    assert stats["model"] == MODEL and stats["uptime_s"] > 0
    assert (stats["engine"], stats["device"], stats["tp_size"]) == ("ok", "cpu", 1)
    assert stats["gpus"] == {"available": False, "reason": "no GPU: the engine runs on the CPU", "devices": []}
    assert set(stats["kv"]) == {"page_size", "pages_total", "pages_used", "pages_pinned", "pages_cached",
                                "pages_free"}
    assert stats["kv"]["pages_total"] == 512 and stats["kv"]["page_size"] == 16
    assert stats["requests"] == {"running": 1, "waiting": 1}
    assert set(stats["totals"]) == {"prompt_tokens", "generation_tokens", "prefix_cache_hit_tokens", "preemptions"}
    assert stats["speculative"] == {"draft_tokens": 0, "accepted_tokens": 0, "verify_rows": 0,
                                    "acceptance_rate": 0.0, "mean_accepted_length": 0.0, "paused_steps": 0}
    assert stats["throughput"]["generation_tokens_per_minute"] >= 10
    assert stats["throughput"]["prompt_tokens_per_minute"] > 0
    (active,) = stats["active"]
    assert set(active) == {"rid", "user", "session", "prompt_tokens", "generated_tokens", "decode_tps", "state",
                           "context_tokens", "cached_tokens", "prefill_pct"}
    assert active["user"] == "carol" and active["prompt_tokens"] > 0
    assert 10 < active["decode_tps"] < 100  # 20 ms per token in the fake engine: about 50/s
    assert active["state"] == "decoding" and active["context_tokens"] >= active["prompt_tokens"] + 10
    (user,) = stats["users"]
    assert (user["key"], user["requests"], user["states"]) == ("carol", 1, {"decoding": 1})
    assert len(stats["history"]["generation_tokens_per_s"]) == 300 // stats["history"]["bucket_s"]
    assert done.wait(20)
    with served.uds() as uds:
        assert uds.get("/stats").json()["active"] == []


def test_ttft_counts_from_arrival(served):
    served.fake.delay_s = 0.05  # before each token: TTFT >= 50 ms, ITL >= 50 ms
    served.fake.reply = "a b"
    with served.http() as http:
        before = _families(http)
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
        after = _families(http)
    ttft, itl = "tokenspeed_time_to_first_token_seconds", "tokenspeed_inter_token_latency_seconds"
    assert _value(after[ttft], "_sum") - _value(before[ttft], "_sum") >= 0.05
    added = _value(after[itl], "_count") - _value(before[itl], "_count")
    assert added == 2 and _value(after[itl], "_sum") - _value(before[itl], "_sum") >= 0.1
