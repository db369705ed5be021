"""Extend (prefill) attention that reads the new tokens' K/V contiguously, by tensor descriptors.

Why a second extend kernel. The generic paged kernel (kernels/triton/attention.py) gathers every
key through the page table: per-element addresses computed in registers and cp.async copies,
which on Hopper leaves an 8K prefill near 50% of the bf16 GEMM rate. But an extend step's new
tokens are also in the layer's K/V inputs `[T, Hk, D]` (written to the cache just before): a
row's new keys are consecutive rows there. Here the keys of a row are taken in two parts:

- the cached prefix (positions < seq_len - qlen), through the page table as before
  (paged_tiles.py's `attn_tile`), all visible to every query of the row;
- the new tokens, whose K and V tiles are copied by host-side tensor descriptors over the
  `[T, Hk * D]` views of k_new / v_new (TMA on Hopper): one `[BLOCK_N, D]` block per tile at
  row `query_start + j`, column `kv_head * D`. Tiles wholly before the program's first query
  token run without masks; the diagonal tiles mask causally and by the row's new-token count
  (a tile may run into the next row's tokens or past T, where TMA reads zeros: masked).

Programs are laid out as in attention.py: BLOCK_T query tokens x G_BLK heads of one KV head
folded into the MMA's M axis, (row, first token) from `block_map` on the device, program ids
reversed so the longest programs start first. An FP8 cache is read as the generic kernel
reads it (the prefix tiles scaled by k_scale / v_scale); the new tokens come from the layer's
16-bit K/V, unquantized. Head dims must be powers of two >= 16 (the
descriptor blocks are exact); `contiguous_ok` says when this kernel applies. The cached prefix
is gathered a little slower than by the generic kernel, so the op takes this kernel only for
batches of mostly new tokens (attention_ops.CONTIGUOUS_MIN_NEW).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.triton.common import (check, has_tma, interpreting, next_pow2, per_batch,
                                   pow2_dim, tma_rows_ok)
from kernels.triton.paged_tiles import (BATCH_META, add_sink, attn_range, block_map,
                                       check_e4m3_words, extend_block)
from kernels.triton.pdl import pdl_begin, pdl_launch


@triton.jit
def _new_tokens_tile(acc, m_i, l_i, q, DescK, DescV, row0, kcol, vcol, j0, n_new, t_rel,
                     scale_log2, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over new tokens [j0, j0 + BLOCK_N) of the row, whose K/V rows
    start at row0 of the contiguous tensors. t_rel [M]: each query's index among the new
    tokens (it sees new tokens j <= t_rel); MASKED: causal + j < n_new (diagonal tiles)."""
    k = DescK.load([row0, kcol])                                          # [N, D]
    qk = tl.dot(q, tl.trans(k)) * scale_log2                              # [M, N]
    if MASKED:
        j = j0 + tl.arange(0, BLOCK_N)                                    # [N]
        vis = (j[None, :] <= t_rel[:, None]) & (j < n_new)[None, :]       # [M, N]
        qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))                                # [M]
    p = tl.exp2(qk - m_new[:, None])                                      # [M, N]
    alpha = tl.exp2(m_i - m_new)                                          # [M]
    l_i = l_i * alpha + tl.sum(p, 1)
    v = DescV.load([row0, vcol])                                          # [N, DV]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)                 # [M, DV]
    return acc, m_new, l_i


@triton.jit(**per_batch(ints=("stride_pt",), pointers=BATCH_META))
def _prefill_kernel(
        Q, KCache, VCache, DescK, DescV, Out, Sinks, PageTable, QueryStart, SeqLens,
        BlockBatch, BlockTok, scale_log2, prefix_scale_log2, v_scale, group,
        stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot,
        stride_oh, stride_pt,
        D: tl.constexpr, DV: tl.constexpr, G_BLK: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr, N_HBLK: tl.constexpr, HAS_SINKS: tl.constexpr,
        PAGE_SIZE: tl.constexpr, PDL: tl.constexpr):
    """grid (blocks of BLOCK_T tokens, KV heads x head blocks). HAS_SINKS: Sinks[Hq] joins
    each row's softmax denominator (paged_tiles.add_sink). The cached prefix's scores take
    prefix_scale_log2 (k_scale folded in) and its values v_scale, applied to the accumulator
    once the prefix is summed (online-softmax rescaling is linear)."""
    pdl_begin(PDL)
    BLOCK_M: tl.constexpr = BLOCK_T * G_BLK
    pid_q, pid_h = tl.program_id(0), tl.program_id(1)
    kvh, hb = pid_h // N_HBLK, pid_h % N_HBLK
    valid, b, t0, q_start, qlen = extend_block(pid_q, BlockBatch, BlockTok, QueryStart)
    prefix = tl.where(valid, tl.load(SeqLens + b) - qlen, 0)  # cached keys before the new ones
    n_new = tl.minimum(t0 + BLOCK_T, qlen)                # new keys this program's rows may see
    r = tl.arange(0, BLOCK_M)
    t_rel = t0 + r // G_BLK                                               # [M] token in row
    hg = hb * G_BLK + r % G_BLK                                           # [M] head in group
    head = kvh * group + hg
    row_ok = (t_rel < qlen) & (hg < group)
    tok = (q_start + t_rel).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)                          # [M, D]
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # the cached prefix: gathered through the page table, visible to every row
    pt = PageTable + b.to(tl.int64) * stride_pt
    pos = prefix + t_rel                                                  # [M] query position
    full_pre = prefix // BLOCK_N * BLOCK_N
    acc, m_i, l_i = attn_range(acc, m_i, l_i, q, q, KCache, KCache, VCache, pt, 0, full_pre,
                               prefix, pos, kvh, PAGE_SIZE, stride_ks, stride_kh, stride_ks,
                               stride_kh, stride_vs, stride_vh, prefix_scale_log2, D, D, DV, D,
                               D, DV, BLOCK_N, False, False, True, 0, True)
    acc = acc * v_scale
    # the new tokens: contiguous rows q_start + j of k_new / v_new
    full_new = (t0 + 1) // BLOCK_N * BLOCK_N           # tiles every row sees whole
    for j0 in tl.range(0, full_new, BLOCK_N):
        acc, m_i, l_i = _new_tokens_tile(acc, m_i, l_i, q, DescK, DescV, q_start + j0,
                                         kvh * D, kvh * DV, j0, n_new, t_rel, scale_log2,
                                         BLOCK_N, False)
    for j0 in tl.range(full_new, n_new, BLOCK_N):
        acc, m_i, l_i = _new_tokens_tile(acc, m_i, l_i, q, DescK, DescV, q_start + j0,
                                         kvh * D, kvh * DV, j0, n_new, t_rel, scale_log2,
                                         BLOCK_N, True)
    if HAS_SINKS:
        l_i = add_sink(l_i, m_i, Sinks, head, row_ok)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                      # [M, DV]
    dv = tl.arange(0, DV)
    tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def _rows_view(x: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """Shape and strides of x [T, H, D] seen as [T, H * D] rows (no copy), or None when its
    heads are not packed (stride(1) != D) or a row is not 16-byte aligned."""
    t, h, d = x.shape
    if x.stride(2) != 1 or (h > 1 and x.stride(1) != d):
        return None
    if not tma_rows_ok(x):
        return None
    return [t, h * d], [x.stride(0), 1]


def contiguous_ok(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> bool:
    """This kernel applies: head dims powers of two >= 16, one K/V row per query token, the
    K/V rows viewable as [T, Hk * D] with 16-byte aligned rows, and a GPU with TMA (sm_90+)
    or the interpreter."""
    if not (pow2_dim(k_new.shape[-1]) and pow2_dim(v_new.shape[-1])):
        return False
    if k_new.shape[0] != q.shape[0] or v_new.shape[:2] != k_new.shape[:2]:
        return False
    if _rows_view(k_new) is None or _rows_view(v_new) is None:
        return False
    return has_tma(k_new)


@dataclass(frozen=True)
class PrefillTiles:
    """Launch shape of the prefill kernel: `rows` query rows per program (tokens x heads of one
    KV head, powers of two), block_n keys per tile."""
    rows: int
    block_n: int
    num_warps: int
    num_stages: int


def prefill_tiles() -> PrefillTiles:
    """The default tiles (the best of `python -m scripts.kernel_bench tune prefill` on an H200
    at 8K and 16K; docs/KERNELS.md); tiny in the interpreter."""
    if interpreting():
        return PrefillTiles(rows=16, block_n=16, num_warps=4, num_stages=2)
    return PrefillTiles(rows=256, block_n=64, num_warps=8, num_stages=3)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      k_new: torch.Tensor, v_new: torch.Tensor, page_table: torch.Tensor,
                      query_start: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                      scale: float, tiles: PrefillTiles | None = None,
                      sinks: torch.Tensor | None = None, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> torch.Tensor:
    """q: [T, Hq, D]; caches [S, Hk, D] / [S, Hk, DV] (holding each row's prefix); k_new /
    v_new: [T, Hk, D] / [T, Hk, DV], the new tokens' keys and values (row t of the batch's
    query tokens) -> [T, Hq, DV], causal. tiles: None for `prefill_tiles`. sinks: [Hq]
    logits in each head's softmax denominator (GPT-OSS) or None. The caches may be FP8, read
    as k_cache * k_scale and v_cache * v_scale."""
    t, hq, d = q.shape
    hk, dv = k_new.shape[1], v_new.shape[-1]
    check(hq % hk == 0, f"query heads {hq} not a multiple of kv heads {hk}")
    check(k_cache.shape[1:] == k_new.shape[1:] and v_cache.shape[1:] == v_new.shape[1:],
          "k_new / v_new must be [T, Hk, D] / [T, Hk, DV] like the caches' slots")
    check(contiguous_ok(q, k_new, v_new), "prefill_attention needs power-of-two head dims, "
          "[T, Hk*D] row views of k_new / v_new, 16-byte aligned rows and sm_90+")
    check(page_table.dim() == 2 and seq_lens.shape[0] == page_table.shape[0]
          and query_start.shape[0] == seq_lens.shape[0] + 1,
          "page_table [B, P], seq_lens [B], query_start [B+1] expected")
    check_e4m3_words(v_cache)
    tiles = prefill_tiles() if tiles is None else tiles
    rows, block_n = tiles.rows, tiles.block_n
    group = hq // hk
    g_blk = min(next_pow2(group), rows)
    block_t = rows // g_blk
    check(block_t >= 1 and block_t * g_blk == rows and pow2_dim(block_n),
          "rows / block_n: powers of two, block_n >= 16")
    out = torch.empty(t, hq, dv, dtype=q.dtype, device=q.device)            # [T, Hq, DV]
    if t == 0:
        return out
    bb, bt, nb = block_map(query_start, t, block_t)
    n_hblk = triton.cdiv(group, g_blk)
    (ks, kst), (vs, vst) = _rows_view(k_new), _rows_view(v_new)
    desc_k = TensorDescriptor(k_new, ks, kst, [block_n, d])
    desc_v = TensorDescriptor(v_new, vs, vst, [block_n, dv])
    _prefill_kernel[(nb, hk * n_hblk)](
        q, k_cache, v_cache, desc_k, desc_v, out, q if sinks is None else sinks, page_table,
        query_start, seq_lens, bb, bt,
        scale * math.log2(math.e), scale * k_scale * math.log2(math.e), v_scale, group,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        D=d, DV=dv, G_BLK=g_blk, BLOCK_T=block_t, BLOCK_N=block_n, N_HBLK=n_hblk,
        HAS_SINKS=sinks is not None, PAGE_SIZE=page_size, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **pdl_launch(q.device))
    return out
