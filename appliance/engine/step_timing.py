"""Timing of rank 0's step loop.

`PredictionError` (always on, a few floats a step): the cost model's predicted step time against
the one measured at commit, over the last steps; /stats reports it.

`StepTimeline` (profiling, off by default): set TOKENSPEED_STEP_TIMING=DIR and each pass of the
step loop records its host phases (ms), the batch it launched and, on CUDA, the GPU time of that
step and the GPU's idle gap before it (CUDA events), in a preallocated ring of the last
`CAPACITY` passes, written to DIR/steps.csv when the engine stops. TOKENSPEED_PROFILE_ROWS=1,192
also runs torch.profiler over PROFILE_STEPS steps once PROFILE_SKIP steps have had at least that
many decode rows, one window per number, and writes DIR/kernels-rows<N>.csv (kernel, calls, time,
share) and DIR/trace-rows<N>.json (chrome://tracing). When off the engine holds `NO_TIMELINE`,
whose methods do nothing.

Phases of one pass (the loop launches step N+1 before it commits step N, see engine.py):
  other      since the previous pass: inbox, stats, admissions
  plan       scheduler.plan()
  to_device  the plan as arrays, the broadcast to other ranks, the host -> device copy
  launch     model forward + sampler prepare + sampler launch (host time; the GPU runs async)
  wait       waiting for step N's tokens (the GPU still busy: host ahead, good)
  commit     scheduler.commit of step N
  emit       step N's outputs built and sent to the frontend
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

TIMING_ENV = "TOKENSPEED_STEP_TIMING"
PROFILE_ROWS_ENV = "TOKENSPEED_PROFILE_ROWS"
CAPACITY = 1 << 17
PROFILE_SKIP = 30  # steps over the threshold before the window opens (caches and graphs warm)
PROFILE_STEPS = 20
ERROR_WINDOW = 64

PHASES = ("other", "plan", "to_device", "launch", "wait", "commit", "emit")
COLUMNS = ("time_s", "step", "decode_rows", "prefill_rows", "prefill_tokens",
           *(f"{p}_ms" for p in PHASES), "gpu_ms", "gpu_gap_ms", "predicted_ms", "measured_ms",
           "profiled")
_COL = {name: i for i, name in enumerate(COLUMNS)}


class PredictionError:
    """The cost model's prediction for each step against its measured time (what the scheduler
    fits the model on), over the last `window` committed steps."""

    def __init__(self, window: int = ERROR_WINDOW) -> None:
        self._pending: dict[int, float] = {}  # launched steps: predicted seconds
        self._pairs: deque[tuple[float, float]] = deque(maxlen=window)

    def planned(self, step: int, predicted_s: float) -> None:
        self._pending[step] = predicted_s

    def committed(self, step: int, measured_s: float) -> None:
        predicted = self._pending.pop(step, None)
        if predicted is not None and measured_s > 0:
            self._pairs.append((predicted, measured_s))

    def stats(self) -> dict[str, float]:
        """Means over the window, in seconds; {} before the first step."""
        if not self._pairs:
            return {}
        pairs = np.array(self._pairs)  # [N, 2] predicted, measured
        return {"step_time_predicted_s": float(pairs[:, 0].mean()),
                "step_time_measured_s": float(pairs[:, 1].mean()),
                "step_time_abs_error_s": float(np.abs(pairs[:, 0] - pairs[:, 1]).mean()),
                "step_time_window_steps": float(len(pairs))}


class NoTimeline:
    """Profiling off: every hook is a no-op."""

    def begin(self) -> None: pass
    def planned(self, plan) -> None: pass
    def mark(self, phase: str) -> None: pass
    def forward_starts(self, step: int) -> None: pass
    def sampler_launched(self, step: int) -> None: pass
    def committed(self, step: int, measured_s: float) -> None: pass
    def end(self) -> None: pass
    def write(self) -> None: pass


NO_TIMELINE = NoTimeline()


def timeline_from_env(device: torch.device) -> StepTimeline | NoTimeline:
    folder = os.environ.get(TIMING_ENV)
    if not folder:
        return NO_TIMELINE
    rows = [int(r) for r in os.environ.get(PROFILE_ROWS_ENV, "").split(",") if r.strip()]
    log.info("step timing on: %s (profiler windows at %s decode rows)", folder, rows or "no")
    return StepTimeline(Path(folder), device, rows)


class StepTimeline(NoTimeline):
    def __init__(self, folder: Path, device: torch.device, profile_rows: list[int]) -> None:
        self.folder = folder
        self._cuda = device.type == "cuda"
        self._rows = np.full((CAPACITY, len(COLUMNS)), np.nan)
        self._n = 0  # passes recorded
        self._row = self._rows[0]
        self._last = time.perf_counter()
        # launched, not yet committed steps: step -> (row index, start event, end event)
        self._launched: dict[int, list] = {}
        self._prev_end: torch.cuda.Event | None = None
        self._windows = sorted(set(profile_rows))  # thresholds still to profile
        self._over = 0  # steps seen over the next threshold
        self._profiler: torch.profiler.profile | None = None
        self._profiled = 0

    # --- the engine's hooks ---------------------------------------------------------------------
    def begin(self) -> None:
        now = time.perf_counter()
        self._row = row = self._rows[self._n % CAPACITY]
        row[:] = np.nan
        row[_COL["time_s"]] = time.time()  # wall clock: lines steps up with the load that ran them
        row[_COL["step"]] = -1
        for phase in PHASES:
            row[_COL[f"{phase}_ms"]] = 0.0
        row[_COL["other_ms"]] = (now - self._last) * 1e3
        row[_COL["profiled"]] = float(self._profiler is not None)
        self._last = now

    def mark(self, phase: str) -> None:
        """The time since the last mark counts to `phase` (a phase may come back: it adds up)."""
        now = time.perf_counter()
        self._row[_COL[f"{phase}_ms"]] += (now - self._last) * 1e3
        self._last = now

    def planned(self, plan) -> None:
        self.mark("plan")
        if plan is None:
            return
        row = self._row
        rows, decode = len(plan.seq_lens), int(plan.num_decode)
        row[_COL["step"]] = plan.step
        row[_COL["decode_rows"]] = decode
        row[_COL["prefill_rows"]] = rows - decode
        row[_COL["prefill_tokens"]] = len(plan.input_ids) - decode
        row[_COL["predicted_ms"]] = plan.predicted_time_s * 1e3
        self._maybe_start_profiler(decode)

    def forward_starts(self, step: int) -> None:
        self.mark("to_device")
        start = None
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        self._launched[step] = [self._n % CAPACITY, start, None]

    def sampler_launched(self, step: int) -> None:
        self.mark("launch")
        if self._cuda and step in self._launched:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._launched[step][2] = end

    def committed(self, step: int, measured_s: float) -> None:
        """Step `step`'s tokens are on the host (its events have completed)."""
        self.mark("commit")
        launched = self._launched.pop(step, None)
        if launched is None:
            return
        index, start, end = launched
        row = self._rows[index]
        row[_COL["measured_ms"]] = measured_s * 1e3
        if start is not None and end is not None:
            end.synchronize()
            row[_COL["gpu_ms"]] = start.elapsed_time(end)
            if self._prev_end is not None:
                row[_COL["gpu_gap_ms"]] = self._prev_end.elapsed_time(start)
            self._prev_end = end

    def end(self) -> None:
        self._n += 1
        if self._profiler is not None:
            self._profiled += 1
            if self._profiled >= PROFILE_STEPS:
                self._stop_profiler()

    def write(self) -> None:
        """steps.csv: the recorded passes, oldest first."""
        if self._profiler is not None:
            self._stop_profiler()
        n = min(self._n, CAPACITY)
        order = np.arange(self._n - n, self._n) % CAPACITY
        path = self.folder / "steps.csv"
        try:  # the engine's shutdown goes on whatever happens here
            self.folder.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                out = csv.writer(f)
                out.writerow(COLUMNS)
                for row in self._rows[order]:
                    out.writerow([_cell(v) for v in row])
        except OSError as e:
            log.error("step timing: cannot write %s: %s", path, e)
            return
        log.info("step timing: %d steps written to %s", n, path)

    # --- torch.profiler windows -------------------------------------------------------------------
    def _maybe_start_profiler(self, decode_rows: int) -> None:
        if self._profiler is not None or not self._windows or decode_rows < self._windows[0]:
            return
        self._over += 1
        if self._over < PROFILE_SKIP:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self._cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.start()
        self._profiled = 0
        self._row[_COL["profiled"]] = 1.0

    def _stop_profiler(self) -> None:
        profiler, self._profiler = self._profiler, None
        threshold = self._windows.pop(0)
        self._over = 0
        if self._cuda:
            torch.cuda.synchronize()
        try:  # profiling never takes the engine down
            profiler.stop()
            self.folder.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(self.folder / f"trace-rows{threshold}.json"))
            write_kernel_table(profiler, self._profiled, self._cuda,
                               self.folder / f"kernels-rows{threshold}.csv")
        except Exception as e:
            log.error("step timing: the profiler window at %d rows failed: %s", threshold, e)


def _cell(value: float) -> str:
    if np.isnan(value):
        return ""
    value = round(float(value), 6 if value > 1e6 else 4)
    return str(int(value)) if value.is_integer() else str(value)


def write_kernel_table(profiler: torch.profiler.profile, steps: int, cuda: bool, path: Path) -> None:
    """GPU kernels (on CPU: operators, by self time) of a profiler window, most time first:
    calls, total and per-step milliseconds, share of all the window's kernel time."""
    totals: list[tuple[str, int, float]] = []
    for event in profiler.key_averages():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = getattr(event, "self_device_time_total", 0.0)
        else:
            micros = event.self_cpu_time_total
        if micros > 0:
            totals.append((event.key, event.count, micros / 1e3))
    totals.sort(key=lambda t: -t[2])
    whole = sum(t[2] for t in totals) or 1.0
    steps = max(steps, 1)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(("kernel", "calls", "calls_per_step", "total_ms", "ms_per_step", "pct"))
        for name, calls, ms in totals:
            out.writerow((name, calls, round(calls / steps, 2), round(ms, 4), round(ms / steps, 4),
                          round(100 * ms / whole, 2)))
