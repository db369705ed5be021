"""Paged attention over a KV cache laid out as [S, Hk, D] with slot = page * page_size + offset.

Decode: one query per row attends all `seq_lens[b]` keys. Extend: row b's queries are the last
`query_start[b+1] - query_start[b]` positions of its `seq_lens[b]` keys, causal.

Two optional arguments serve GPT-OSS (both off by default):
- `window` > 0: sliding-window attention, the query at position p sees keys p - window < n <= p
  (HF's `sliding_window`). Only the keys inside some query's window are gathered, so the slots
  of earlier positions are never read (their pages may have been given to someone else).
- `sinks[Hq]`: a learned logit per head that joins the softmax's denominator and attends to
  nothing: p_n = exp(s_n) / (exp(sink_h) + sum_m exp(s_m)).

The caches may be FP8 (kernels/reference/kv_cache.py): keys are read as `k_cache * k_scale`,
values as `v_cache * v_scale` (float32); both scales are 1.0 for a 16/32-bit cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference.kv_cache import dequantize
from kernels.reference.rope import rope_store_kv
from kernels.registry import register
from kernels.step_memo import memoized


def gather_slots(page_table_row: torch.Tensor, seq_len: int, page_size: int,
                 start: int = 0) -> torch.Tensor:
    """page_table_row: [P] -> the cache slots of positions [start, seq_len), [N] int64."""
    n = torch.arange(start, seq_len, device=page_table_row.device)   # [N]
    return page_table_row.long()[n // page_size] * page_size + n % page_size


def window_start(first_query_pos: int, window: int) -> int:
    """The first key position any query from `first_query_pos` on can see."""
    return max(0, first_query_pos - window + 1) if window > 0 else 0


def _softmax(s: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """s: [..., N] masked logits -> probabilities over N; sink (broadcastable to [..., 1]):
    a logit in the denominator that takes its share of the mass and attends to nothing."""
    if sink is None:
        return s.softmax(dim=-1)
    sink = sink.expand(*s.shape[:-1], 1)
    return torch.cat([s, sink], dim=-1).softmax(dim=-1)[..., :-1]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
            scale: float, k_pos: torch.Tensor | None = None, window: int = 0,
            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [M, Hq, D], k: [N, Hk, D], v: [N, Hk, Dv] at positions q_pos [M] / k_pos [N]
    (default 0..N-1); key n visible iff k_pos[n] <= q_pos and, with a window,
    k_pos[n] > q_pos - window -> [M, Hq, Dv] float32."""
    g = q.shape[1] // k.shape[1]
    if k_pos is None:
        k_pos = torch.arange(k.shape[0], device=q.device)            # [N]
    k32 = k.float().repeat_interleave(g, dim=1)                       # [N, Hq, D]
    v32 = v.float().repeat_interleave(g, dim=1)                       # [N, Hq, Dv]
    s = torch.einsum("mhd,nhd->hmn", q.float(), k32) * scale           # [Hq, M, N]
    hidden = k_pos[None, :] > q_pos[:, None]                          # [M, N]
    if window > 0:
        hidden |= k_pos[None, :] <= q_pos[:, None] - window
    s = s.masked_fill(hidden[None], float("-inf"))
    sink = None if sinks is None else sinks.float()[:, None, None]      # [Hq, 1, 1]
    return torch.einsum("hmn,nhd->mhd", _softmax(s, sink), v32)       # [M, Hq, Dv]


def _decode_slots(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                  window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache slots of every row's keys up to the longest row (with a window, each row's
    last `window` positions): slots [B, N], seen [B, N] and the additive mask [B, 1, 1, N]
    (0 or -inf). A shorter row's tail reads its own last key again (a written, finite slot:
    the slots past the end may hold anything), to be masked by `seen`. Every layer of a step
    asks the same: kept for the step (kernels/step_memo.py)."""
    lens = seq_lens.long()
    width = int(lens.max()) if lens.numel() else 0
    first = torch.zeros_like(lens)
    if window > 0:
        width = min(width, window)
        first = (lens - width).clamp(min=0)
    n = first[:, None] + torch.arange(width, device=lens.device)            # [B, N] positions
    seen = n < lens[:, None]                                                 # [B, N]
    n = torch.minimum(n, (lens - 1).clamp(min=0)[:, None])
    slots = page_table.long().gather(1, n // page_size) * page_size + n % page_size  # [B, N]
    mask = torch.zeros(seen.shape, device=lens.device).masked_fill_(~seen, float("-inf"))
    return slots, seen, mask[:, None, None, :]


@register("decode_attention", backend="torch", priority=0)
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                     scale: float, sinks: torch.Tensor | None = None, window: int = 0,
                     k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, Dv]. All rows at once (a CPU step is a few ops per layer, not a
    few per row), each kv head's query group attending together (no repeated K/V): torch's
    fused scaled_dot_product_attention with the shorter rows' tails masked, or, with sinks,
    the softmax written out. sinks [Hq] / window / k_scale, v_scale: see the module doc."""
    b, hq, d = q.shape
    hk = k_cache.shape[1]
    slots, seen, mask = memoized(("decode_slots", page_size, window), (seq_lens, page_table),
                                 lambda: _decode_slots(page_table, seq_lens, page_size, window))
    k32 = dequantize(k_cache[slots], k_scale)                                # [B, N, Hk, D]
    v32 = dequantize(v_cache[slots], v_scale)                                # [B, N, Hk, Dv]
    q32 = q.float().view(b, hk, hq // hk, d)                                 # [B, Hk, G, D]
    if sinks is None:
        out = F.scaled_dot_product_attention(q32, k32.transpose(1, 2), v32.transpose(1, 2),
                                             attn_mask=mask, scale=scale)
    else:
        s = torch.einsum("bkgd,bnkd->bkgn", q32, k32) * scale                # [B, Hk, G, N]
        s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
        p = _softmax(s, sinks.float().view(1, hk, hq // hk, 1))
        out = torch.einsum("bkgn,bnkd->bkgd", p, v32)                        # [B, Hk, G, Dv]
    # a row with no keys (seq_len 0) gets zeros, not the NaN of an empty softmax
    return out.nan_to_num(0.0).reshape(b, hq, -1).to(q.dtype)


@register("rope_decode_attention", backend="torch", priority=0)
def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          positions: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int,
                          is_neox: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, page_table: torch.Tensor,
                          seq_lens: torch.Tensor, page_size: int, scale: float,
                          sinks: torch.Tensor | None = None, k_scale: float = 1.0,
                          v_scale: float = 1.0) -> torch.Tensor:
    """A decode step's attention with its rope and cache write: `rope_store_kv` of the new
    tokens (q: [B, Hq, D], k: [B, Hk, D], v: [B, Hk, Dv], one a row), then `decode_attention`
    of the rotated q -> [B, Hq, Dv]."""
    q_rot, _ = rope_store_kv(q, k, v, positions, cos_sin, rotary_dim, is_neox, k_cache, v_cache,
                             slot_mapping, k_scale, v_scale)
    return decode_attention(q_rot, k_cache, v_cache, page_table, seq_lens, page_size, scale,
                            sinks=sinks, k_scale=k_scale, v_scale=v_scale)


@register("extend_attention", backend="torch", priority=0)
def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
                     page_size: int, scale: float, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                     window: int = 0, k_scale: float = 1.0, v_scale: float = 1.0
                     ) -> torch.Tensor:
    """q: [T, Hq, D], caches [S, Hk, D] / [S, Hk, Dv] -> [T, Hq, Dv]. k_new / v_new (the new
    tokens' K/V, already in the cache) are accepted for the kernels that read them
    contiguously; the reference reads the cache only. sinks [Hq] / window / k_scale, v_scale:
    module doc."""
    out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=q.dtype, device=q.device)
    qs, sl = query_start.tolist(), seq_lens.tolist()
    for b in range(len(sl)):
        t0, t1 = qs[b], qs[b + 1]
        if sl[b] < t1 - t0:   # fewer keys than new tokens: an extend graph's decode row, given
            out[t0:t1] = 0    # none (the layer takes it from the decode launch)
        elif t1 > t0:
            out[t0:t1] = extend_row(q[t0:t1], k_cache, v_cache, page_table[b], sl[b], page_size,
                                    scale, sinks, window, k_scale, v_scale)
    return out


def extend_row(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               page_table_row: torch.Tensor, seq_len: int, page_size: int, scale: float,
               sinks: torch.Tensor | None = None, window: int = 0, k_scale: float = 1.0,
               v_scale: float = 1.0) -> torch.Tensor:
    """One extend row: q [M, Hq, D], the last M of its seq_len positions -> [M, Hq, Dv] in
    q's dtype, causal (extend_attention's arguments)."""
    m = q.shape[0]
    start = window_start(seq_len - m, window)
    slots = gather_slots(page_table_row, seq_len, page_size, start)   # [N]
    k_pos = torch.arange(start, seq_len, device=q.device)             # [N]
    q_pos = torch.arange(seq_len - m, seq_len, device=q.device)       # [M]
    return _attend(q, dequantize(k_cache[slots], k_scale), dequantize(v_cache[slots], v_scale),
                   q_pos, scale, k_pos, window, sinks).to(q.dtype)
