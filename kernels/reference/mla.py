"""Multi-head latent attention (DeepSeek-V2/V3) over the compressed paged cache.

kv_cache[S, L + R] holds per token the latent c (L, also the value) and the shared rope key
(R). Scores are q_latent . c + q_rope . k_rope; outputs are latent ([.., H, L]); the caller
applies W_UV afterwards (weights absorbed)."""
from __future__ import annotations

import torch

from kernels.reference.attention import extend_attention
from kernels.registry import register


@register("mla_extend", backend="torch", priority=0)
def mla_extend(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
               page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
               page_size: int, scale: float) -> torch.Tensor:
    """q_latent: [T, H, L], q_rope: [T, H, R], kv_cache: [S, L+R] -> [T, H, L]."""
    lat = q_latent.shape[-1]
    q = torch.cat([q_latent, q_rope], dim=-1)            # [T, H, L+R]
    k = kv_cache[:, None, :]                             # [S, 1, L+R]
    v = kv_cache[:, None, :lat]                          # [S, 1, L]
    return extend_attention(q, k, v, page_table, query_start, seq_lens, page_size, scale)


@register("mla_decode", backend="torch", priority=0)
def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
               page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
               scale: float) -> torch.Tensor:
    """q_latent: [B, H, L], q_rope: [B, H, R] -> [B, H, L]."""
    qs = torch.arange(q_latent.shape[0] + 1, device=q_latent.device, dtype=torch.int32)
    return mla_extend(q_latent, q_rope, kv_cache, page_table, qs, seq_lens, page_size, scale)
