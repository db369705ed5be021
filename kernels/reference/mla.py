"""Multi-head latent attention (DeepSeek-V2/V3) over the compressed paged cache.

kv_cache[S, L + R] holds per token the latent c (L, also the value) and the shared rope key
(R). Scores are q_latent . c + q_rope . k_rope; outputs are latent ([.., H, L]); the caller
applies W_UV afterwards (weights absorbed). `mla_prefill` is the other form: keys and values
decompressed per head (W_UK c, W_UV c), contiguous per row, for long prefills."""
from __future__ import annotations

import torch

from kernels.reference.attention import _attend, extend_attention
from kernels.reference.linear import head_matmul
from kernels.reference.rope import rope_store_kv
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
               scale: float, w_uv: torch.Tensor | None = None) -> torch.Tensor:
    """q_latent: [B, H, L], q_rope: [B, H, R] -> o_latent [B, H, L]; with w_uv [H, L, Dv]
    (MLA's W_UV^T) projected per head, o_latent [b, h] @ w_uv[h]: [B, H, Dv]."""
    qs = torch.arange(q_latent.shape[0] + 1, device=q_latent.device, dtype=torch.int32)
    out = mla_extend(q_latent, q_rope, kv_cache, page_table, qs, seq_lens, page_size, scale)
    return out if w_uv is None else head_matmul(out, w_uv)


@register("mla_absorb_rope", backend="torch", priority=0)
def mla_absorb_rope(q_nope: torch.Tensor, w_uk: torch.Tensor, q_rope: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin: torch.Tensor, rotary_dim: int, is_neox: bool,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    k_scale: float = 1.0, v_scale: float = 1.0,
                    v_norm_weight: torch.Tensor | None = None, v_norm_eps: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's query side of an absorbed step: (head_matmul(q_nope [T, H, Dn], w_uk [H, Dn, L])
    [T, H, L], the rotated q_rope [T, H, R]), with rope_store_kv's cache write of (k, v)
    (its arguments after q_rope: MLA's rope key and latent, v_norm_weight its latent norm)."""
    q_rot, _ = rope_store_kv(q_rope, k, v, positions, cos_sin, rotary_dim, is_neox, k_cache,
                             v_cache, slot_mapping, k_scale, v_scale, v_norm_weight, v_norm_eps)
    return head_matmul(q_nope, w_uk), q_rot


@register("mla_prefill", backend="torch", priority=0)
def mla_prefill(q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor,
                k_rope: torch.Tensor, v: torch.Tensor, query_start: torch.Tensor,
                seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """MLA with decompressed keys/values (per head, as plain multi-head attention):
    q_nope [T, H, Dn], q_rope [T, H, R], k_nope [N, H, Dn], k_rope [N, R] (shared by the
    heads), v [N, H, Dv] -> [T, H, Dv]. Row b's keys are rows sum(seq_lens[:b]) ..
    + seq_lens[b] of k / v (its cached prefix, then its new tokens); its queries, rows
    query_start[b] .. query_start[b+1] of q, are the last positions of those keys, causal."""
    heads = q_nope.shape[1]
    q = torch.cat([q_nope, q_rope], dim=-1)                                  # [T, H, Dn+R]
    k = torch.cat([k_nope, k_rope[:, None, :].expand(-1, heads, -1)], dim=-1)  # [N, H, Dn+R]
    out = torch.empty(q.shape[0], heads, v.shape[-1], dtype=q.dtype, device=q.device)
    qs, sl = query_start.tolist(), seq_lens.tolist()
    k0 = 0
    for b, n in enumerate(sl):
        t0, t1 = qs[b], qs[b + 1]
        if t1 > t0:
            q_pos = torch.arange(n - (t1 - t0), n, device=q.device)          # [M]
            out[t0:t1] = _attend(q[t0:t1], k[k0:k0 + n], v[k0:k0 + n], q_pos,
                                 scale).to(q.dtype)
        k0 += n
    return out
