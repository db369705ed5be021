"""Timing, same-run ceilings and the results table: the one harness of the GPU benchmarks in
scripts/ (this package, bench_ceiling.py, bench_allreduce.py, mla_decode_timeline.py).

- `graph_ms`: a CUDA-graph replay with the L2 flushed before every call (what a kernel costs
  inside the engine's decode graph); `bench_ms`: eager calls (Python launch cost included);
  `loop_ms`: a fixed number of eager calls between two CUDA events (collectives, whose ranks
  must all make the same calls).
- `measure_ceilings`: a large device-to-device copy and a bf16 GEMM, the best of three: the
  rates the benchmark's percentages are of.
- `Session`: the rows of one benchmark run, printed as they come and as a markdown table.
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import triton
import triton.testing

DEV = "cuda"
BF16 = torch.bfloat16
TOL = 2e-2  # relative error allowed against the torch reference: bf16 operands


def bench_ms(fn: Callable[[], object], rep: int = 60) -> float:
    """Median ms of eager calls (CPU launch cost included when the GPU waits for it)."""
    return float(triton.testing.do_bench(fn, warmup=15, rep=rep, return_mode="median"))


def loop_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Mean ms per call of `iters` eager calls after `warmup` ones, timed by CUDA events. The
    call count is fixed, so ranks of a collective stay in step (do_bench picks its own)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(256 << 20, dtype=torch.int8, device=DEV)   # larger than any L2


def sequence_us(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Microseconds a call of `calls`, captured in order in one CUDA graph and replayed: what
    a step's graph does, no host time between launches. Each call its own operands (a layer's
    weights or cache), so that together they stream from HBM, not from the L2."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def graph_ms(fn: Callable[[], object], n: int = 10, replays: int = 7, captures: int = 2
             ) -> float:
    """Median ms of fn as a CUDA graph replay, the L2 flushed before each call: graph of n x
    (flush, fn) minus graph of n x flush, over n; the best of `captures` captures (a capture
    right after a large free can replay steadily slower than the next one: docs/KERNELS.md,
    "Measuring"). Falls back to bench_ms if capture fails."""
    return min(_graph_ms_once(fn, n, replays) for _ in range(captures))


def _graph_ms_once(fn: Callable[[], object], n: int, replays: int) -> float:
    flush = _l2_flush_buffer()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        g_fn, g_flush = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_fn):
            for _ in range(n):
                flush.zero_()
                fn()
        with torch.cuda.graph(g_flush):
            for _ in range(n):
                flush.zero_()
    except Exception as e:  # noqa: BLE001 - e.g. an op that syncs with the host
        print(f"  (graph capture failed, eager timing: {type(e).__name__})")
        return bench_ms(fn)
    return max(_replay_ms(g_fn, replays) - _replay_ms(g_flush, replays), 1e-6) / n


def _replay_ms(g: torch.cuda.CUDAGraph, replays: int) -> float:
    """Median ms of one replay (the first, a warm-up, dropped)."""
    times = [loop_ms(g.replay, iters=1, warmup=0) for _ in range(replays + 1)]
    times = sorted(times[1:])
    return times[len(times) // 2]


@dataclass(frozen=True)
class Ceilings:
    copy_gbs: float        # device-to-device copy, bytes read + written per second / 1e9
    gemm_tflops: float     # bf16 8192^3 matmul

    def of(self, unit: str) -> float:
        return self.gemm_tflops if unit == "TFLOP/s" else self.copy_gbs

    def line(self) -> str:
        return (f"ceilings (same run): copy {self.copy_gbs:.0f} GB/s (read+write), "
                f"bf16 GEMM 8192^3 {self.gemm_tflops:.0f} TFLOP/s")


def measure_ceilings(trials: int = 3) -> Ceilings:
    """Copy bandwidth (2 GiB) and bf16 GEMM rate, the best of `trials` timings each: clocks
    vary between runs, and the best is the conservative ceiling for the percentages."""
    src = torch.randn(1 << 30, dtype=BF16, device=DEV)                  # 2 GiB
    dst = torch.empty_like(src)
    ms = min(bench_ms(lambda: dst.copy_(src)) for _ in range(trials))
    copy_gbs = 2 * src.numel() * src.element_size() / ms / 1e6
    del src, dst
    a = torch.randn(8192, 8192, dtype=BF16, device=DEV)
    b = torch.randn(8192, 8192, dtype=BF16, device=DEV)
    ms = min(bench_ms(lambda: a @ b) for _ in range(trials))
    del a, b
    torch.cuda.empty_cache()
    return Ceilings(copy_gbs, 2 * 8192 ** 3 / ms / 1e9)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of out against ref (NaN if out holds a NaN)."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def rate(work: float, ms: float, unit: str) -> float:
    """work (bytes, or FLOPs for TFLOP/s) per ms in `unit`."""
    return work / ms / (1e9 if unit == "TFLOP/s" else 1e6)


@dataclass
class Row:
    kernel: str
    shape: str
    ms: float
    unit: str                      # "GB/s" or "TFLOP/s"
    value: float
    pct: float                     # of the same-run ceiling for that unit
    err: float | None = None       # relative error vs the torch reference (None: not checked)
    baselines: dict = field(default_factory=dict)   # name -> ms
    note: str = ""


@dataclass
class Session:
    """One benchmark run: the ceilings measured first, whether the baselines (torch
    reference, SDPA, loops, split-off variants) are timed, and the rows so far."""
    ceilings: Ceilings
    baselines: bool = True
    rows: list[Row] = field(default_factory=list)

    def baseline(self, fn: Callable[[], float | None]) -> float | None:
        """fn() (a baseline's ms) when this run times baselines, else None."""
        return fn() if self.baselines else None

    def emit(self, kernel: str, shape: str, ms: float, *, nbytes: float = 0.0,
             flops: float = 0.0, err: float | None = None, **baselines: float | None) -> Row:
        """Record and print one row: GB/s from nbytes, or TFLOP/s from flops."""
        unit = "TFLOP/s" if flops else "GB/s"
        value = rate(flops or nbytes, ms, unit)
        row = Row(kernel, shape, ms, unit, value, 100.0 * value / self.ceilings.of(unit), err,
                  {k: v for k, v in baselines.items() if v is not None})
        self.rows.append(row)
        base = " ".join(f"{k}={v * 1e3:.1f}us" for k, v in row.baselines.items())
        e = "unchecked" if err is None else f"err={err:.1e}" + ("" if err < TOL else " FAIL")
        print(f"{kernel:20s} {shape:28s} {ms * 1e3:10.1f}us {value:8.1f} {unit:7s} "
              f"{row.pct:5.1f}%  {e:14s} {base}", flush=True)
        return row

    def failures(self) -> list[Row]:
        """Rows whose check against the reference failed (err >= TOL or NaN)."""
        return [r for r in self.rows if r.err is not None and not r.err < TOL]

    def table(self) -> str:
        lines = [f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
                 f"triton {triton.__version__}  "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                 self.ceilings.line(),
                 "| kernel | shape | triton us | achieved | % ceiling | err | baselines us |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            base = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r.baselines.items())
            if r.note:
                base += f"; {r.note}" if base else r.note
            err = "-" if r.err is None else f"{r.err:.1e}"
            lines.append(f"| {r.kernel} | {r.shape} | {r.ms * 1e3:.1f} | {r.value:.0f} "
                         f"{r.unit} | {r.pct:.0f}% | {err} | {base} |")
        return "\n".join(lines)

    def save(self, out_dir: str) -> None:
        """kernel_bench.md (the table) and kernel_bench.json (ceilings and rows)."""
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "kernel_bench.md"), "w") as f:
            f.write(self.table() + "\n")
        with open(os.path.join(out_dir, "kernel_bench.json"), "w") as f:
            json.dump({"ceilings": asdict(self.ceilings),
                       "rows": [asdict(r) for r in self.rows]}, f, indent=1)
