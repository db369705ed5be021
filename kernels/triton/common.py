"""Helpers shared by the Triton kernels: the backend's priority, support predicates, launch
sizing."""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Mapping

import torch
import triton

from kernels.reference.kv_cache import FP8_KV_DTYPE

# Every Triton op registers at this priority, above the torch reference's 0
PRIORITY = 10
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_cuda(f: Mapping[str, Any]) -> bool:
    """The registry predicate shared by every Triton op: CUDA and a float dtype."""
    return f.get("device") == "cuda" and f.get("dtype") in FLOAT_DTYPES


def kv_dtype_ok(f: Mapping[str, Any], fp8: bool) -> bool:
    """The op's KV cache (feature `kv_dtype`; absent or None: the model's dtype) is one it
    reads: the model's dtype, or with `fp8` an e4m3 cache on a GPU that converts it (sm_89+)."""
    kv = f.get("kv_dtype")
    if kv is None or kv == f.get("dtype"):
        return True
    return fp8 and kv == FP8_KV_DTYPE and _fp8_capable()


@functools.lru_cache(maxsize=None)
def _fp8_capable() -> bool:
    """Triton's e4m3 conversions need sm_89+ (Ada, Hopper); the interpreter emulates them."""
    if interpreting():
        return True
    try:
        return torch.cuda.get_device_capability() >= (8, 9)
    except (RuntimeError, AssertionError):   # no CUDA device
        return False


# Tiles of the GEMM-shaped kernels (attention, MoE) are sized for 16-bit operands: float32 needs
# twice the shared memory and fails to launch at real shapes (Llama-3.1-8B attention asked for
# 262,400 B on an H200, which has 232,448 B), so the torch reference serves float32 there.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def on_cuda_half(f: Mapping[str, Any]) -> bool:
    """CUDA and a 16-bit float dtype: the predicate of the tensor-core kernels."""
    return f.get("device") == "cuda" and f.get("dtype") in HALF_DTYPES


# Triton compiles a variant per value class of each integer argument (1, a multiple of 16,
# other) and per 16-byte alignment of each pointer. Arguments that change from batch to batch
# (split counts, page-table widths; the engine's per-batch metadata, views into one packed
# copy, sliced at the decode rows) would then compile new variants while serving, seconds of
# TTFT each (docs/KERNELS.md, "No Triton compile while serving").
_ALIGN_KW = ("do_not_specialize_on_alignment"
             if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters
             else None)


def per_batch(ints: tuple[str, ...] = (), pointers: tuple[str, ...] = ()) -> dict[str, list]:
    """triton.jit keywords that keep these arguments unspecialized: `ints` by value,
    `pointers` by alignment (where the installed Triton can)."""
    kw: dict[str, list] = {"do_not_specialize": list(ints)}
    if _ALIGN_KW and pointers:
        kw[_ALIGN_KW] = list(pointers)
    return kw


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pow2_dim(n: int) -> bool:
    """n is a power of two >= 16: a tensor-core tile dimension that needs no masking."""
    return n >= 16 and n == next_pow2(n)


def tma_rows_ok(x: torch.Tensor) -> bool:
    """x's rows (dim 0) can be copied by a tensor descriptor: the base and the row stride are
    16-byte aligned."""
    return x.data_ptr() % 16 == 0 and x.stride(0) * x.element_size() % 16 == 0


def has_tma(x: torch.Tensor) -> bool:
    """x's device copies by tensor descriptors (TMA: sm_90+), or the interpreter emulates it."""
    if interpreting():
        return True
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def num_sms(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (4 for the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def check(cond: bool, msg: str) -> None:
    """Validate input with an error, not an assert."""
    if not cond:
        raise ValueError(msg)
