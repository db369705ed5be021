"""CPU paged attention: decode rows and short extend rows (speculative verify rows, small
chunks) attend all at once, their keys gathered a page at a time.

The reference gathers keys slot by slot and walks extend rows one by one, each with its own
gather. On two cores (SmolLM2-135M's heads, 8 rows over 1.5K-token contexts, per layer): a
decode step's attention took 3.6 ms, of which the slot gather 2.6; a verify step of the same
rows with 2 drafts each 10.8 ms, so that drafts cost a CPU step three times what the tokens
themselves do and the draft policy refused them. Here both are one gather of whole pages
(`index_select` of 16-token blocks) and one fused scaled_dot_product_attention over every
row, each query seeing its own causal prefix through the mask.

Extend rows of more than SHORT_QUERIES tokens (prefill chunks, compute-bound already) take
the reference's row-by-row path, as do sliding windows and attention sinks (GPT-OSS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import attention as reference
from kernels.reference.kv_cache import dequantize
from kernels.registry import register
from kernels.step_memo import memoized

SHORT_QUERIES = 32  # extend rows of up to this many tokens are batched with the decodes


def _on_cpu(f) -> bool:
    return f["device"] == "cpu"


def _gather_pages(cache: torch.Tensor, pages: torch.Tensor, page_size: int,
                  scale: float) -> torch.Tensor:
    """cache [S, Hk, D], pages [B, P] -> the rows' keys [B, Hk, P * page_size, D] float32."""
    b, p = pages.shape
    paged = cache.view(-1, page_size, *cache.shape[1:])                 # [S/ps, ps, Hk, D]
    rows = paged.index_select(0, pages.reshape(-1)).view(b, p * page_size, *cache.shape[1:])
    return dequantize(rows, scale).transpose(1, 2)                      # [B, Hk, N, D]


def _mask(q_pos: torch.Tensor, keys: int) -> torch.Tensor:
    """q_pos [B, M] (-1: a padding query) -> additive mask [B, M, N]: key n is seen from
    position p iff n <= p (a row's positions end at its length: its later slots are unseen)."""
    n = torch.arange(keys)
    seen = n[None, None, :] <= q_pos[:, :, None].long()
    return torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q [B, M, Hq, D], k / v [B, Hk, N, D(v)], mask [B, M, N] -> [B, M, Hq, Dv] float32; each kv
    head's query group attends together (GQA without repeating K/V); a fully masked query
    (padding) gets zeros."""
    b, m, hq, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    qh = q.float().view(b, m, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * m, d)
    full = mask[:, None, None].expand(b, 1, g, m, mask.shape[-1]).reshape(b, 1, g * m, -1)
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=full, scale=scale)
    out = out.nan_to_num(0.0).view(b, hk, g, m, -1)                      # [B, Hk, G, M, Dv]
    return out.permute(0, 3, 1, 2, 4).reshape(b, m, hq, -1)


def _decode_layout(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages every row reads (up to the longest row's) and the mask [B, 1, N]."""
    lens = seq_lens.long()
    pages = -(-int(lens.max()) // page_size) if lens.numel() else 0
    table = page_table[:, :max(pages, 1)].long()
    return table, _mask((lens - 1)[:, None], table.shape[1] * page_size)


@register("decode_attention", backend="cpu", priority=5, supports=_on_cpu)
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                     scale: float, sinks: torch.Tensor | None = None, window: int = 0,
                     k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """The reference's contract (kernels/reference/attention.py)."""
    if sinks is not None or window > 0:
        return reference.decode_attention(q, k_cache, v_cache, page_table, seq_lens, page_size,
                                          scale, sinks, window, k_scale, v_scale)
    table, mask = memoized(("cpu_decode_layout", page_size), (seq_lens, page_table),
                           lambda: _decode_layout(page_table, seq_lens, page_size))
    k = _gather_pages(k_cache, table, page_size, k_scale)
    v = _gather_pages(v_cache, table, page_size, v_scale)
    return _attend(q[:, None], k, v, mask, scale)[:, 0].to(q.dtype)


def _extend_layout(query_start: torch.Tensor, seq_lens: torch.Tensor, page_table: torch.Tensor,
                   page_size: int) -> tuple[list[tuple[int, int, int, int]], torch.Tensor,
                                            torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor]:
    """Short rows batched: (the long rows as (row, first token, end token, length), short
    rows' ids [S], their tokens' indices [S, M]
    (padding: 0), which of those are real [S, M], the pages [S, P], the mask [S, M, N]); S = 0
    when every row is long or empty."""
    qs, sl = query_start.tolist(), seq_lens.tolist()
    qlen = [qs[b + 1] - qs[b] for b in range(len(sl))]
    short = [b for b in range(len(sl)) if 0 < qlen[b] <= SHORT_QUERIES]
    long = [(b, qs[b], qs[b + 1], sl[b]) for b in range(len(sl)) if qlen[b] > SHORT_QUERIES]
    if not short:
        none = torch.empty(0, dtype=torch.long)
        return long, none, none, none, none, torch.empty(0)
    m = max(qlen[b] for b in short)
    j = torch.arange(m)
    rows = torch.tensor(short)
    n_q = torch.tensor([qlen[b] for b in short])[:, None]                # [S, 1]
    real = j[None, :] < n_q                                             # [S, M]
    tokens = torch.where(real, torch.tensor([qs[b] for b in short])[:, None] + j, 0)
    lens = torch.tensor([sl[b] for b in short])[:, None]
    q_pos = torch.where(real, lens - n_q + j, -1)                       # [S, M]
    pages = -(-max(sl[b] for b in short) // page_size)
    table = page_table[rows, :pages].long()
    return long, rows, tokens, real, table, _mask(q_pos, pages * page_size)


@register("extend_attention", backend="cpu", priority=5, supports=_on_cpu)
def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
                     page_size: int, scale: float, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                     window: int = 0, k_scale: float = 1.0, v_scale: float = 1.0
                     ) -> torch.Tensor:
    """The reference's contract (kernels/reference/attention.py)."""
    if sinks is not None or window > 0:
        return reference.extend_attention(q, k_cache, v_cache, page_table, query_start,
                                          seq_lens, page_size, scale, sinks=sinks,
                                          window=window, k_scale=k_scale, v_scale=v_scale)
    long, rows, tokens, real, table, mask = memoized(
        ("cpu_extend_layout", page_size), (query_start, seq_lens, page_table),
        lambda: _extend_layout(query_start, seq_lens, page_table, page_size))
    out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=q.dtype)
    if rows.numel():
        k = _gather_pages(k_cache, table, page_size, k_scale)
        v = _gather_pages(v_cache, table, page_size, v_scale)
        short = _attend(q[tokens], k, v, mask, scale).to(q.dtype)       # [S, M, Hq, Dv]
        out[tokens[real]] = short[real]
    for b, t0, t1, length in long:
        out[t0:t1] = reference.extend_row(q[t0:t1], k_cache, v_cache, page_table[b], length,
                                          page_size, scale, k_scale=k_scale, v_scale=v_scale)
    return out
