"""The pieces `/stats` is built from for the dashboard: token-rate history, last-minute counters,
users grouped by session or user, GPU telemetry through NVML (a stand-in `pynvml` module here:
these machines have no GPU; the real module is exercised by the daemon on GPU boxes)."""

from __future__ import annotations

import sys
import types

import pytest

from appliance.engine.protocol import RequestProgress
from appliance.server.counter_window import CounterWindow
from appliance.server.gpus import GpuTelemetry
from appliance.server.stats import _request, _users
from appliance.server.tracker import RateWindow, TrackedRequest


def test_rate_window_series_and_total():
    window = RateWindow()
    for second, count in [(1000, 10), (1001, 20), (1004, 5), (1009, 100), (1010, 7)]:
        window.add(count, second + 0.5)
    now = 1010.2  # second 1010 is not over: it is in the total, not in the series
    assert window.series(now, bucket_s=5, span_s=10) == [35 / 5, 100 / 5]
    assert window.total(now, window_s=60) == 142
    assert window.total(now, window_s=2) == 107
    assert window.series(now + 400, bucket_s=5, span_s=300) == [0.0] * 60  # all trimmed
    assert window.total(now + 400) == 0


def test_counter_window_covers_the_last_minute_of_samples():
    window = CounterWindow(window_s=60)
    assert window.change(0.0, {"hits": 0.0}) == ({}, 0.0)
    for t in range(0, 200, 10):  # hits grow 1 per second
        window.record(float(t), {"hits": float(t)})
    change, covered = window.change(200.0, {"hits": 200.0})
    assert covered == pytest.approx(60.0) and change == {"hits": 60.0}
    # A restarted engine's counters start again from zero: the change is the new total.
    assert window.change(201.0, {"hits": 5.0})[0] == {"hits": 5.0}


def _tracked(rid, user="", session="", prompt=10, generated=0, first_token_at=None):
    r = TrackedRequest(rid, user, prompt, started_at=0.0, session=session)
    r.generated_tokens, r.first_token_at = generated, first_token_at
    return r


def test_request_merges_the_scheduler_view_and_users_group_by_session_then_user():
    cc = "user_ab12_account_77_session_5f0c"  # Claude Code's metadata.user_id
    active = [
        _request(_tracked(1, user=cc, session="5f0c", generated=3, first_token_at=9.0),
                 RequestProgress(1, "decoding", 1013, 960, 1012), 10.0),
        _request(_tracked(2, user=cc, session="5f0c", prompt=4000),
                 RequestProgress(2, "prefilling", 4000, 0, 1000), 10.0),
        _request(_tracked(3, user="alice"), None, 10.0),  # not reported by the engine yet
        _request(_tracked(4, user="alice", generated=2, first_token_at=9.5), None, 10.0),
        _request(_tracked(5), None, 10.0),
        _request(_tracked(6, user="bob"), RequestProgress(6, "decoding", 11, 0, 10), 10.0),  # no token here yet
    ]
    assert active[1]["prefill_pct"] == 25.0 and active[1]["decode_tps"] is None
    assert (active[2]["state"], active[3]["state"]) == ("queued", "decoding")
    users = {u["key"]: u for u in _users(active)}
    assert set(users) == {"5f0c", "alice", "", "bob"}
    assert users["bob"]["states"] == {"decoding": 1} and users["bob"]["decode_tps"] is None
    agent = users["5f0c"]
    assert agent["user"] == cc and agent["requests"] == 2
    assert agent["states"] == {"decoding": 1, "prefilling": 1} and agent["prefill_pct"] == 25.0
    assert (agent["context_tokens"], agent["cached_tokens"]) == (5013, 960)
    assert agent["decode_tps"] == active[0]["decode_tps"]
    assert users["alice"]["states"] == {"queued": 1, "decoding": 1}
    assert users[""]["decode_tps"] is None  # nothing decodes yet


class _FakeNvml(types.ModuleType):
    """The part of nvidia-ml-py GpuTelemetry calls, with two GPUs; power unsupported on one."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.reads = 0

    def nvmlInit(self):  # noqa: N802 (NVML's names)
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetHandleByUUID(self, uuid):  # noqa: N802
        return {"GPU-a": 0, "GPU-b": 1}[uuid]

    def nvmlDeviceGetName(self, h):  # noqa: N802
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, h):  # noqa: N802
        self.reads += 1
        return types.SimpleNamespace(used=(h + 1) * 2**30, total=141 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):  # noqa: N802
        return types.SimpleNamespace(gpu=50 + h)

    def nvmlDeviceGetPowerUsage(self, h):  # noqa: N802
        if h == 1:
            raise self.NVMLError("Not Supported")
        return 512_345

    def nvmlDeviceGetEnforcedPowerLimit(self, h):  # noqa: N802
        return 700_000


def test_gpu_telemetry_reads_each_gpu_by_uuid(monkeypatch):
    nvml = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    reading = GpuTelemetry(["GPU-b", "GPU-a"]).read()  # rank 0 runs on GPU-b
    assert reading["available"] is True
    first, second = reading["devices"]
    assert first == {"index": 0, "uuid": "GPU-b", "name": "NVIDIA H200", "utilization_pct": 51.0,
                     "memory_used_bytes": 2 * 2**30, "memory_total_bytes": 141 * 2**30,
                     "power_w": None, "power_limit_w": 700.0}
    assert second["power_w"] == pytest.approx(512.345) and second["utilization_pct"] == 50.0


def test_gpu_telemetry_caches_readings_between_polls(monkeypatch):
    nvml = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    telemetry = GpuTelemetry(["GPU-a"])
    telemetry.read()
    telemetry.read()
    assert nvml.reads == 1


def test_gpu_telemetry_says_why_there_is_none(monkeypatch):
    assert GpuTelemetry([]).read() == {"available": False, "reason": "no GPU: the engine runs on the CPU",
                                       "devices": []}
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(fail_init=True))
    assert GpuTelemetry(["GPU-a"]).read()["reason"] == "NVML: Driver Not Loaded"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert GpuTelemetry(["GPU-a"]).read()["reason"].startswith("nvidia-ml-py is not importable")
