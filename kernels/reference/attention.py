"""Paged attention over a KV cache laid out as [S, Hk, D] with slot = page * page_size + offset.

Decode: one query per row attends all `seq_lens[b]` keys. Extend: row b's queries are the last
`query_start[b+1] - query_start[b]` positions of its `seq_lens[b]` keys, causal.
"""
from __future__ import annotations

import torch

from kernels.registry import register


def gather_slots(page_table_row: torch.Tensor, seq_len: int, page_size: int) -> torch.Tensor:
    """page_table_row: [P] -> the cache slots of the first `seq_len` tokens, [seq_len] int64."""
    n = torch.arange(seq_len, device=page_table_row.device)          # [N]
    return page_table_row.long()[n // page_size] * page_size + n % page_size


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q: [M, Hq, D], k: [N, Hk, D], v: [N, Hk, Dv], q_pos: [M] (key n visible iff n <= q_pos)
    -> [M, Hq, Dv] float32."""
    g = q.shape[1] // k.shape[1]
    k32 = k.float().repeat_interleave(g, dim=1)                       # [N, Hq, D]
    v32 = v.float().repeat_interleave(g, dim=1)                       # [N, Hq, Dv]
    s = torch.einsum("mhd,nhd->hmn", q.float(), k32) * scale           # [Hq, M, N]
    n = torch.arange(k.shape[0], device=q.device)
    s = s.masked_fill(n[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", s.softmax(dim=-1), v32)       # [M, Hq, Dv]


@register("decode_attention", backend="torch", priority=0)
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                     scale: float) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, Dv]. All rows at once (a CPU step is a few dozen ops, not a
    few dozen per row): keys gathered up to the longest row, the shorter rows' tails masked,
    each kv head's query group attending together (no repeated K/V)."""
    b, hq, d = q.shape
    hk = k_cache.shape[1]
    n = torch.arange(int(seq_lens.max()), device=q.device)                   # [N]
    slots = page_table.long()[:, n // page_size] * page_size + n % page_size  # [B, N]
    k32, v32 = k_cache[slots].float(), v_cache[slots].float()  # [B, N, Hk, D], [B, N, Hk, Dv]
    q32 = q.float().view(b, hk, hq // hk, d)                                 # [B, Hk, G, D]
    s = torch.einsum("bkgd,bnkd->bkgn", q32, k32) * scale                    # [B, Hk, G, N]
    s = s.masked_fill(n[None, None, None, :] >= seq_lens.view(b, 1, 1, 1), float("-inf"))
    p = s.softmax(dim=-1).nan_to_num(0.0)          # a row with no keys (seq_len 0) gets zeros
    out = torch.einsum("bkgn,bnkd->bkgd", p, v32)                            # [B, Hk, G, Dv]
    return out.reshape(b, hq, -1).to(q.dtype)


@register("extend_attention", backend="torch", priority=0)
def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
                     page_size: int, scale: float, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D], caches [S, Hk, D] / [S, Hk, Dv] -> [T, Hq, Dv]. k_new / v_new (the new
    tokens' K/V, already in the cache) are accepted for the kernels that read them
    contiguously; the reference reads the cache only."""
    out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=q.dtype, device=q.device)
    qs, sl = query_start.tolist(), seq_lens.tolist()
    for b in range(len(sl)):
        t0, t1, n = qs[b], qs[b + 1], sl[b]
        if t1 == t0:
            continue
        slots = gather_slots(page_table[b], n, page_size)             # [N]
        q_pos = torch.arange(n - (t1 - t0), n, device=q.device)       # [M]
        out[t0:t1] = _attend(q[t0:t1], k_cache[slots], v_cache[slots], q_pos, scale).to(q.dtype)
    return out
