"""The engine's step timing: the cost model's predicted against measured step time (always on,
for /stats) and the per-step timeline with a profiler window (TOKENSPEED_STEP_TIMING)."""
from __future__ import annotations

import csv
import time

import pytest
import torch

from appliance.engine import step_timing
from appliance.engine.protocol import GenerateRequest
from appliance.engine.step_timing import NO_TIMELINE, PredictionError

from .conftest import FakeRunner, run_to_end

VOCAB = 64


def _runner() -> FakeRunner:
    return FakeRunner(VOCAB, lambda last: torch.nn.functional.one_hot((last + 1) % VOCAB, VOCAB))


def _submit(engine, rids, prompt_len: int, new_tokens: int) -> None:
    for rid in rids:
        engine._submit(GenerateRequest(rid, list(range(1, prompt_len + 1)), max_new_tokens=new_tokens,
                                       temperature=0.0, ignore_eos=True))


def test_prediction_error_pairs_each_step_with_its_prediction():
    error = PredictionError(window=2)
    assert error.stats() == {}
    error.planned(1, 0.010)
    error.planned(2, 0.020)
    error.committed(1, 0.012)
    error.committed(7, 0.5)  # never planned: ignored
    error.committed(2, 0.0)  # not measured: ignored
    assert error.stats() == pytest.approx({"step_time_predicted_s": 0.010, "step_time_measured_s": 0.012,
                                           "step_time_abs_error_s": 0.002, "step_time_window_steps": 1})
    for step, (predicted, measured) in enumerate([(0.1, 0.3), (0.2, 0.1), (0.3, 0.3)], start=3):
        error.planned(step, predicted)
        error.committed(step, measured)
    stats = error.stats()  # the last two steps only
    assert stats["step_time_window_steps"] == 2
    assert stats["step_time_abs_error_s"] == pytest.approx(0.05)
    assert stats["step_time_predicted_s"] == pytest.approx(0.25)


def test_engine_stats_carry_the_cost_model_error(make_engine):
    engine = make_engine(_runner())
    assert engine.timeline is NO_TIMELINE  # off unless TOKENSPEED_STEP_TIMING is set
    _submit(engine, [1, 2], prompt_len=8, new_tokens=5)
    run_to_end(engine)
    engine._publish_stats(force=True)
    values = engine.sent[-1].values
    assert values["step_time_window_steps"] == 5  # one prefill step, four decode steps
    assert values["step_time_measured_s"] > 0 and values["step_time_predicted_s"] > 0
    assert values["step_time_abs_error_s"] >= 0


def test_timeline_records_every_step_and_a_profiler_window(make_engine, tmp_path, monkeypatch):
    folder = tmp_path / "timing"
    monkeypatch.setenv(step_timing.TIMING_ENV, str(folder))
    monkeypatch.setenv(step_timing.PROFILE_ROWS_ENV, "3,100")  # 100 rows never run: no window
    monkeypatch.setattr(step_timing, "PROFILE_SKIP", 2)
    monkeypatch.setattr(step_timing, "PROFILE_STEPS", 4)
    engine = make_engine(_runner())
    _submit(engine, [1, 2, 3], prompt_len=10, new_tokens=12)
    run_to_end(engine)
    engine.timeline.write()
    with (folder / "steps.csv").open() as f:
        rows = list(csv.DictReader(f))
    launched = [r for r in rows if r["step"] != "-1"]
    assert len(launched) == 12 and len(rows) >= 13  # a pass after the last launch only commits
    assert [int(r["step"]) for r in launched] == sorted(int(r["step"]) for r in launched)
    first, decodes = launched[0], launched[1:]
    assert (first["prefill_rows"], first["prefill_tokens"], first["decode_rows"]) == ("3", "30", "0")
    assert all(r["decode_rows"] == "3" and r["prefill_tokens"] == "0" for r in decodes)
    for r in launched:  # every launched step was committed and measured; no GPU here
        assert float(r["measured_ms"]) > 0 and float(r["predicted_ms"]) > 0 and r["gpu_ms"] == ""
    for r in rows:
        phases = [float(r[f"{p}_ms"]) for p in step_timing.PHASES]
        assert min(phases) >= 0 and float(r["launch_ms"] or 0) >= 0
    assert [r["profiled"] for r in rows].count("1") == 4  # the window: 4 steps once 2 had 3 rows
    with (folder / "kernels-rows3.csv").open() as f:
        table = list(csv.DictReader(f))
    assert table and sum(float(r["pct"]) for r in table) == pytest.approx(100, abs=0.5)
    assert (folder / "trace-rows3.json").is_file()
    assert not (folder / "kernels-rows100.csv").exists()


class SlowRunner(FakeRunner):
    """Each forward takes FORWARD_S (a synchronous device: the CPU)."""

    FORWARD_S = 0.05

    def forward(self, batch) -> torch.Tensor:
        time.sleep(self.FORWARD_S)
        return super().forward(batch)


def test_measured_step_time_is_the_steps_own_not_two_overlapped_steps(make_engine):
    """Step N+1 is launched before step N is committed: measured from its launch, step N would
    also count step N-1's remaining time (twice the step on a busy pipeline)."""
    engine = make_engine(SlowRunner(VOCAB, _runner().logits_fn))
    _submit(engine, [1], prompt_len=4, new_tokens=8)
    run_to_end(engine)
    pairs = list(engine.step_error._pairs)
    assert len(pairs) == 8
    # One forward each (and some host work), not two. On the CPU the forward runs inside the
    # launch, so the host sees step N's tokens one pass late: the first step of a busy stretch
    # takes two forwards and the last none; the steps between are the cadence a user sees.
    for _, measured in pairs[1:-1]:
        assert SlowRunner.FORWARD_S <= measured < 1.5 * SlowRunner.FORWARD_S


def test_a_timeline_that_cannot_write_leaves_the_engine_running(make_engine, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(step_timing.TIMING_ENV, str(blocker / "timing"))  # under a file: no folder
    monkeypatch.setenv(step_timing.PROFILE_ROWS_ENV, "1")
    monkeypatch.setattr(step_timing, "PROFILE_SKIP", 1)
    monkeypatch.setattr(step_timing, "PROFILE_STEPS", 2)
    engine = make_engine(_runner())
    _submit(engine, [1], prompt_len=4, new_tokens=6)
    run_to_end(engine)  # the profiler window closed and failed to write: the steps went on
    assert not engine.requests
    engine.timeline.write()  # logged, not raised
