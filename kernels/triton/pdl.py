"""Programmatic dependent launch (PDL, sm_90+): a kernel's programs start while the kernel
before it ends.

A batch-1 decode step of Llama-3.1-8B runs ~330 dependent kernels back to back, most of them
shorter than 15 us. In stream order each one starts only when the one before has finished and
its writes are flushed, then pays its own launch and first loads. Launched with PDL
(`launch_pdl`; H200, scripts/gpu_pdl.py: that step 1.035x faster, DeepSeek-V2-Lite's
1.04-1.05x, no change from 16 rows up), a kernel's programs are scheduled once every program
of the kernel before has called `griddepcontrol.launch_dependents` (or ended), and they wait in
`griddepcontrol.wait` (the kernel before has finished and its writes are visible) before they
touch what it may have written. What no kernel of a step
writes (the weights) may be read before the wait: the GEMV prefetches its first weight tile
into L2 meanwhile (gemv.py). CUDA graphs capture the launches with their programmatic edges.

The rule that keeps it correct: every kernel launched with `launch_pdl` calls `pdl_begin`
before it reads or writes any tensor another kernel may touch. `pdl_launch` gives the kernel's
`PDL` constexpr and the launch option together, so they cannot disagree. A kernel launched
without PDL after one launched with it waits for it in stream order, as before; chains stay
ordered because each PDL kernel finishes only after its wait, that is after its predecessor.

TOKENSPEED_PDL=0 launches everything in plain stream order (a benchmark's A/B switch).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.triton.common import interpreting

ENV = "TOKENSPEED_PDL"


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """The keywords of a launch on `device`: the kernel's `PDL` constexpr, and Triton's
    `launch_pdl` option where the GPU and the environment allow PDL."""
    if device.type == "cuda" and pdl_enabled(device.index if device.index is not None
                                             else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@functools.lru_cache(maxsize=None)
def pdl_enabled(index: int) -> bool:
    """sm_90+ (griddepcontrol), not Triton's interpreter, and not turned off by the user."""
    if interpreting() or os.environ.get(ENV, "1") == "0":
        return False
    return torch.cuda.get_device_capability(index) >= (9, 0)


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the lines at `ptrs` (no registers, no wait): what a kernel may read before
    its PDL wait, the weights, streams in while the kernel before it ends."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """Wait until the kernel before has finished (its writes visible), then let the next
    kernel's programs launch; nothing without PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
