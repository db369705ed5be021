"""`linear` on the CPU for the few rows of a decode step: the fastest of a few equivalent ways
to ask BLAS for x @ W.T, measured on this machine for each shape.

`F.linear(x[M, K], W[N, K])` lets MKL pick a kernel per shape, and for small M its pick can be
far from the best: on 2 cores, SmolLM2's lm_head (N=49,152, K=576) takes 16.5 ms at M=8 as
F.linear but 8.9 ms as (W @ x.T).T, while for the layers' shapes at M=8 F.linear is the faster
(scripts/bench_cpu_decode.py measures the whole step). So for M <= MAX_TUNED_ROWS each
(M, N, K) tries every way TRIALS times on real calls, round-robin (each call's result is
used), then keeps the one with the lowest median time. Larger M (prefill chunks) always takes
F.linear. The ways differ only in summation order (float rounding), so where ranks of a
process group must compute replicated values bit for bit alike (tensor parallel on the CPU),
each taking its own timings could part them: there every call takes F.linear.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.reference.activation import silu_and_mul
from kernels.registry import register

MAX_TUNED_ROWS = 64
TRIALS = 5

Way = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _direct(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _transposed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # (W @ x.T).T: BLAS sees a wide right-hand side of M columns instead of M short rows
    return torch.mm(w, x.t()).t().contiguous()


def _transposed_pair(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # one row as two: MKL runs a single-column product on one thread, two columns on all
    return torch.mm(w, torch.cat([x, x]).t())[:, :1].t().contiguous()


WAYS: dict[str, Way] = {"direct": _direct, "transposed": _transposed,
                        "transposed_pair": _transposed_pair}


class _Tuner:
    """The ways tried for one (M, N, K) and their times, then the chosen one."""

    def __init__(self, rows: int) -> None:
        names = [n for n in WAYS if n != "transposed_pair" or rows == 1]
        self.samples: dict[str, list[float]] = {n: [] for n in names}
        self.calls = 0
        self.chosen: str | None = None

    def next_way(self) -> str:
        names = list(self.samples)
        return names[self.calls % len(names)]

    def record(self, name: str, seconds: float) -> None:
        self.samples[name].append(seconds)
        self.calls += 1
        if all(len(s) >= TRIALS for s in self.samples.values()):
            self.chosen = min(self.samples, key=lambda n: statistics.median(self.samples[n]))


_tuners: dict[tuple[int, int, int, torch.dtype], _Tuner] = {}


def chosen_ways() -> dict[tuple[int, int, int, torch.dtype], str | None]:
    """(M, N, K, dtype) -> the way kept (None while still trying), for tests and benchmarks."""
    return {key: t.chosen for key, t in _tuners.items()}


def _in_process_group() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


@register("linear", backend="cpu", priority=5, supports=lambda f: f["device"] == "cpu")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x: [M, K], weight: [N, K], bias: [N] or None -> [M, N] (F.linear's contract)."""
    m = x.shape[0]
    if (x.dim() != 2 or not 0 < m <= MAX_TUNED_ROWS or x.requires_grad
            or _in_process_group()):
        return F.linear(x, weight, bias)
    key = (m, weight.shape[0], weight.shape[1], x.dtype)
    tuner = _tuners.get(key)
    if tuner is None:
        tuner = _tuners[key] = _Tuner(m)
    if tuner.chosen is not None:
        out = WAYS[tuner.chosen](x, weight)
    else:
        name = tuner.next_way()
        started = time.perf_counter()
        out = WAYS[name](x, weight)
        tuner.record(name, time.perf_counter() - started)
    return out if bias is None else out.add_(bias)


@register("linear_silu_and_mul", backend="cpu", priority=5,
          supports=lambda f: f["device"] == "cpu")
def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(linear(x, weight, bias)), the linear tuned as above."""
    return silu_and_mul(linear(x, weight, bias))
