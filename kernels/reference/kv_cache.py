"""Writing new keys/values into a paged KV cache (slot = page * page_size + offset), and the
cache's element format.

A cache holds `x / scale` in its dtype and is read back as `cache * scale` (float32). The scale
is a per-layer float (1.0 unless an FP8 checkpoint calibrated it: `self_attn.k_scale` /
`v_scale`). An FP8 (e4m3) cache saturates at +-448 (`FP8_MAX`) instead of overflowing to NaN;
a 16/32-bit cache is written with a plain cast (its scale is 1.0).
"""
from __future__ import annotations

import torch

from kernels.registry import register
from kernels.step_memo import memoized

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_KV_DTYPE).max)      # 448.0


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x -> the cache's element format: x / scale in `dtype`, saturated to +-FP8_MAX for FP8
    (rounded to nearest even)."""
    if dtype != FP8_KV_DTYPE and scale == 1.0:
        return x.to(dtype)
    y = x.float() * (1.0 / scale)     # a product, as the Triton kernels compute it
    if dtype == FP8_KV_DTYPE:
        y = y.clamp(-FP8_MAX, FP8_MAX)
    return y.to(dtype)


def dequantize(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Cache elements -> float32 values (x * scale)."""
    return x.float() * scale if scale != 1.0 else x.float()


@register("store_kv", backend="torch", priority=0)
def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k: [T, Hk, D], v: [T, Hk, Dv] -> k_cache[S, Hk, D], v_cache[S, Hk, Dv] at slot_mapping[T],
    each quantized to its cache's format (`quantize`, k_scale / v_scale).

    Slots < 0 are padding and are skipped."""
    slots, keep = memoized("store_kv_slots", (slot_mapping,), lambda: _kept_slots(slot_mapping))
    if keep is not None:
        k, v = k[keep], v[keep]
    k_cache[slots] = quantize(k, k_cache.dtype, k_scale)
    v_cache[slots] = quantize(v, v_cache.dtype, v_scale)


def _kept_slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The slots to write [T'] int64, and the rows that go there [T'] (None: every row; the
    common case, so that the rows are not gathered again at every layer)."""
    keep = (slot_mapping >= 0).nonzero().squeeze(1)                 # [T']
    if keep.numel() == slot_mapping.numel():
        return slot_mapping.to(torch.int64, copy=True), None   # never the anchor itself
    return slot_mapping[keep].long(), keep
