"""Writing new keys/values into a paged KV cache (slot = page * page_size + offset)."""
from __future__ import annotations

import torch

from kernels.registry import register


@register("store_kv", backend="torch", priority=0)
def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k: [T, Hk, D], v: [T, Hk, Dv] -> k_cache[S, Hk, D], v_cache[S, Hk, Dv] at slot_mapping[T].

    Slots < 0 are padding and are skipped."""
    keep = slot_mapping >= 0                      # [T]
    slots = slot_mapping[keep].long()             # [T']
    k_cache[slots] = k[keep].to(k_cache.dtype)
    v_cache[slots] = v[keep].to(v_cache.dtype)
