"""Register-lean MLA decode: the latent dimension in chunks, whole KV tiles copied by TMA.

Why a second MLA decode kernel. The generic paged kernel (attention.py) serves MLA decode with
one program per (row, head block, split) holding one [G_BLK, L] fp32 accumulator and the whole
query: register-bound, ~2 programs per SM, well short of copy bandwidth on DeepSeek's shapes
(16 heads, latent L=512, rope R=64, cache [S, 576] bf16). Occupancy is what hides the gathered
loads' latency here (Triton's pipeliner gives the gathered tile a single buffer), so this
kernel spends fewer registers:

- The latent is cut into NC chunks of CH = L // NC columns (NC in {1, 2, 4}, CH a power of two
  >= 16) with NC separate fp32 accumulators [G_BLK, CH]. Per KV tile of BLOCK_N keys and per
  chunk c, q_c [G_BLK, CH] is scored against k_c [N, CH], the rope part q_rope . k_rope is
  added, and after the online softmax (exp2, scale in log2 units) each accumulator takes
  p @ k_c: the loaded k_c is also the value chunk (MLA: the latent is key and value).
- The query is hoisted before the KV loop (Triton stages it in shared memory) or, with
  q_in_loop, re-read per tile from L1/L2 (the loop is marked disable_licm so that the compiler
  keeps the loads there); max_regs caps ptxas' registers per thread. Both are tuning knobs.
- When a KV tile lies in one page (page_size % BLOCK_N == 0; DeepSeek's pages hold 64 keys)
  its rows are contiguous in the cache, so interior tiles are copied by host-side tensor
  descriptors (one [BLOCK_N, CH] block per chunk, one [BLOCK_N, R] for the rope part) instead
  of per-key gathers. The partial last tile is still gathered with a key mask, so slots past a
  row's end (never written: possibly NaN) are not read.

Split-KV writes split_kv.py's partial-output/LSE layout, merged by its `merge_splits`; or,
when the caller passes W_UV (one token, the op's projected form), by the projection's own
launch (head_gemv.py's `merged_head_gemv`): no merge launch between them.
Registered through attention_ops.py for latents that split into power-of-two chunks. The
defaults (64-key tiles, 4 warps, 2 stages, query hoisted) and what ptxas and the sweeps said
about the alternatives: docs/KERNELS.md, "MLA decode".
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.step_memo import memoized
from kernels.triton.common import (check, has_tma, interpreting, next_pow2, per_batch,
                                   pow2_dim, tma_rows_ok)
from kernels.triton.head_gemv import head_matmul, merged_head_gemv, merged_head_gemv_applies
from kernels.triton.pdl import pdl_begin, pdl_launch
from kernels.triton.split_kv import (DEFAULT_SIZING, SPLIT_INTS, SplitSizing, merge_splits,
                                     split_buffers, split_range)

G_BLK_DEFAULT = 16     # query heads per program (the mma.sync M tile); more heads: more blocks
MERGE_INTO_PROJECTION = True   # one token's merge inside W_UV's launch (module doc)


@triton.jit
def _load_q(QRow, c0, ch, row_ok, EVEN_H: tl.constexpr):
    """Query columns [c0, c0 + CH) of the program's heads: QRow [M, 1] pointers -> [M, CH]."""
    ptrs = QRow + c0 + ch[None, :]                                        # [M, CH]
    if EVEN_H:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)


@triton.jit
def _load_k(KRow, DescLat, row0, c0, ch, n_ok, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Cache columns [c0, c0 + CH) of the tile's keys -> [N, CH]: a descriptor copy of the
    rows from slot row0 (USE_TMA), or gathered through KRow [N, 1] pointers."""
    if USE_TMA:
        k = DescLat.load([row0, c0])
    elif MASKED:
        k = tl.load(KRow + c0 + ch[None, :], mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(KRow + c0 + ch[None, :])
    return k


@triton.jit
def _load_q_rope(QRRow, r, row_ok, R: tl.constexpr, EVEN_H: tl.constexpr,
                 EVEN_R: tl.constexpr):
    """The rope query of the program's heads: QRRow [M, 1] pointers -> [M, BLOCK_R]."""
    ptrs = QRRow + r[None, :]                                             # [M, BLOCK_R]
    if EVEN_H and EVEN_R:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=row_ok[:, None] & (r[None, :] < R), other=0.0)


@triton.jit
def _q_chunk(q_hoisted, QRow, c0, ch, row_ok, EVEN_H: tl.constexpr, Q_IN_LOOP: tl.constexpr):
    """The query chunk [M, CH] at columns c0: loaded now (Q_IN_LOOP) or the hoisted one."""
    if Q_IN_LOOP:
        return _load_q(QRow, c0, ch, row_ok, EVEN_H)
    else:
        return q_hoisted


@triton.jit
def _mla_chunk_tile(acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, q_rope, QRow, QRRow, KV,
                    DescLat, DescRope, PageTable, n0, hi, page_size, stride_kv, scale_log2,
                    row_ok, L: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr,
                    CH: tl.constexpr, NC: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr, EVEN_H: tl.constexpr, EVEN_R: tl.constexpr,
                    Q_IN_LOOP: tl.constexpr, TMA: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N). acc0..acc3 are [M, CH] (those
    past NC are placeholders, returned untouched); q0..q3, q_rope are the hoisted query chunks
    (placeholders when Q_IN_LOOP: then loaded here, per tile); MASKED predicates keys >= hi
    (the last tile only). TMA: an unmasked tile lies in one page (page_size % BLOCK_N == 0),
    so its rows are contiguous and the tensor descriptors DescLat ([BLOCK_N, CH] blocks) and
    DescRope ([BLOCK_N, BLOCK_R]) copy them; otherwise the rows are gathered per key."""
    offs_n = n0 + tl.arange(0, BLOCK_N)                                   # [N]
    n_ok = offs_n < hi                                                    # [N]
    ch = tl.arange(0, CH)                                                 # [CH]
    r = tl.arange(0, BLOCK_R)                                             # [BLOCK_R]
    USE_TMA: tl.constexpr = TMA and not MASKED
    if USE_TMA:
        row0 = tl.load(PageTable + n0 // page_size) * page_size + n0 % page_size  # first slot
        KRow = KV                                                         # unused
    else:
        if MASKED:
            page = tl.load(PageTable + offs_n // page_size, mask=n_ok, other=0)  # [N]
        else:
            page = tl.load(PageTable + offs_n // page_size)               # [N]
        slot = page.to(tl.int64) * page_size + offs_n % page_size         # [N]
        KRow = KV + slot[:, None] * stride_kv                             # [N, 1] pointers
        row0 = 0                                                          # unused
    # scores: sum over chunks of q_c . k_c, plus the rope part
    k0 = _load_k(KRow, DescLat, row0, 0 * CH, ch, n_ok, MASKED, USE_TMA)  # [N, CH]
    q = _q_chunk(q0, QRow, 0 * CH, ch, row_ok, EVEN_H, Q_IN_LOOP)         # [M, CH]
    qk = tl.dot(q, tl.trans(k0))                                          # [M, N]
    if NC >= 2:
        k1 = _load_k(KRow, DescLat, row0, 1 * CH, ch, n_ok, MASKED, USE_TMA)  # [N, CH]
        q = _q_chunk(q1, QRow, 1 * CH, ch, row_ok, EVEN_H, Q_IN_LOOP)     # [M, CH]
        qk += tl.dot(q, tl.trans(k1))
    if NC >= 4:
        k2 = _load_k(KRow, DescLat, row0, 2 * CH, ch, n_ok, MASKED, USE_TMA)  # [N, CH]
        q = _q_chunk(q2, QRow, 2 * CH, ch, row_ok, EVEN_H, Q_IN_LOOP)     # [M, CH]
        qk += tl.dot(q, tl.trans(k2))
        k3 = _load_k(KRow, DescLat, row0, 3 * CH, ch, n_ok, MASKED, USE_TMA)  # [N, CH]
        q = _q_chunk(q3, QRow, 3 * CH, ch, row_ok, EVEN_H, Q_IN_LOOP)     # [M, CH]
        qk += tl.dot(q, tl.trans(k3))
    if USE_TMA:
        k_rope = DescRope.load([row0, L])                                 # [N, BLOCK_R]
    elif MASKED or not EVEN_R:
        k_rope = tl.load(KRow + L + r[None, :], mask=n_ok[:, None] & (r[None, :] < R),
                         other=0.0)                                       # [N, BLOCK_R]
    else:
        k_rope = tl.load(KRow + L + r[None, :])                           # [N, BLOCK_R]
    if Q_IN_LOOP:
        q_rope = _load_q_rope(QRRow, r, row_ok, R, EVEN_H, EVEN_R)        # [M, BLOCK_R]
    qk += tl.dot(q_rope, tl.trans(k_rope))                                # [M, N]
    qk = qk * scale_log2
    if MASKED:  # every row of a decode program has the same sequence: a per-key mask
        qk = tl.where(n_ok[None, :], qk, float("-inf"))                   # [M, N]
    # online softmax in log2 units
    m_new = tl.maximum(m_i, tl.max(qk, 1))                                # [M]
    p = tl.exp2(qk - m_new[:, None])                                      # [M, N]
    alpha = tl.exp2(m_i - m_new)                                          # [M]
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(k0.dtype)
    # values: the latent chunks already loaded as keys
    acc0 = acc0 * alpha[:, None] + tl.dot(p, k0)                          # [M, CH]
    if NC >= 2:
        acc1 = acc1 * alpha[:, None] + tl.dot(p, k1)                      # [M, CH]
    if NC >= 4:
        acc2 = acc2 * alpha[:, None] + tl.dot(p, k2)                      # [M, CH]
        acc3 = acc3 * alpha[:, None] + tl.dot(p, k3)                      # [M, CH]
    return acc0, acc1, acc2, acc3, m_new, l_i


@triton.jit
def _store_chunk(acc, c0, l_safe, ORow, PRow, ch, row_ok, keep, num_splits,
                 EVEN_H: tl.constexpr):
    """acc [M, CH] / l -> Out (bf16/fp16, one split) or PartO (fp32, rows where keep: real
    heads of a split with keys), columns [c0, c0 + CH)."""
    out = acc / l_safe[:, None]                                           # [M, CH]
    if num_splits == 1:  # a run-time branch: one variant serves split and whole launches
        ptrs = ORow + c0 + ch[None, :]                                    # [M, CH]
        if EVEN_H:
            tl.store(ptrs, out.to(ORow.dtype.element_ty))
        else:
            tl.store(ptrs, out.to(ORow.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(PRow + c0 + ch[None, :], out, mask=keep[:, None])


@triton.jit(**per_batch(ints=SPLIT_INTS + ("stride_pt",), pointers=("PageTable", "SeqLens")))
def _mla_decode_chunked_kernel(
        QL, QR, KV, DescLat, DescRope, Out, PartO, PartL, PageTable, SeqLens,
        scale_log2, num_heads, min_split_len, num_splits,
        stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_kv, stride_pt,
        stride_ob, stride_oh, stride_pot, stride_poh, stride_pos, stride_plt, stride_plh,
        L: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, CH: tl.constexpr,
        NC: tl.constexpr, G_BLK: tl.constexpr, BLOCK_N: tl.constexpr,
        EVEN_H: tl.constexpr, EVEN_R: tl.constexpr,
        Q_IN_LOOP: tl.constexpr, TMA: tl.constexpr, PAGE_SIZE: tl.constexpr, PDL: tl.constexpr):
    """grid (B, head blocks, splits): one sequence, G_BLK heads, one piece of the KV range.
    DescLat / DescRope: tensor descriptors of KV when TMA (else KV itself, unused)."""
    pdl_begin(PDL)
    b, hb, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b64 = b.to(tl.int64)
    head = hb * G_BLK + tl.arange(0, G_BLK)                               # [M]
    row_ok = head < num_heads                                             # [M]
    QRow = QL + b64 * stride_qlb + head[:, None] * stride_qlh             # [M, 1] pointers
    QRRow = QR + b64 * stride_qrb + head[:, None] * stride_qrh            # [M, 1] pointers
    if Q_IN_LOOP:  # placeholders: the tiles load the query themselves
        q0 = tl.zeros([1], dtype=tl.float32)
        q1, q2, q3, q_rope = q0, q0, q0, q0
    else:  # hoisted: live across the KV loop (in shared memory or registers)
        ch = tl.arange(0, CH)
        q0 = _load_q(QRow, 0 * CH, ch, row_ok, EVEN_H)                    # [M, CH]
        q1, q2, q3 = q0, q0, q0
        if NC >= 2:
            q1 = _load_q(QRow, 1 * CH, ch, row_ok, EVEN_H)                # [M, CH]
        if NC >= 4:
            q2 = _load_q(QRow, 2 * CH, ch, row_ok, EVEN_H)                # [M, CH]
            q3 = _load_q(QRow, 3 * CH, ch, row_ok, EVEN_H)                # [M, CH]
        q_rope = _load_q_rope(QRRow, tl.arange(0, BLOCK_R), row_ok, R, EVEN_H,
                              EVEN_R)                                     # [M, BLOCK_R]
    seq_len = tl.load(SeqLens + b)
    lo, hi = split_range(split, seq_len, min_split_len, num_splits, BLOCK_N)
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N          # end of whole tiles
    acc0 = tl.zeros([G_BLK, CH], dtype=tl.float32)                        # [M, CH] each
    if NC >= 2:
        acc1 = tl.zeros([G_BLK, CH], dtype=tl.float32)
    else:
        acc1 = tl.zeros([1], dtype=tl.float32)                            # placeholder
    if NC >= 4:
        acc2 = tl.zeros([G_BLK, CH], dtype=tl.float32)
        acc3 = tl.zeros([G_BLK, CH], dtype=tl.float32)
    else:
        acc2 = tl.zeros([1], dtype=tl.float32)
        acc3 = tl.zeros([1], dtype=tl.float32)
    m_i = tl.full([G_BLK], -1.0e30, dtype=tl.float32)                     # [M]
    l_i = tl.zeros([G_BLK], dtype=tl.float32)                             # [M]
    pt = PageTable + b64 * stride_pt
    # disable_licm: keep the query loads in the loop (not live across it: the point of this)
    for n0 in tl.range(lo, full_end, BLOCK_N, disable_licm=True):         # interior tiles
        acc0, acc1, acc2, acc3, m_i, l_i = _mla_chunk_tile(
            acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, q_rope, QRow, QRRow, KV, DescLat,
            DescRope, pt, n0, hi, PAGE_SIZE, stride_kv, scale_log2, row_ok, L, R, BLOCK_R, CH,
            NC, BLOCK_N, False, EVEN_H, EVEN_R, Q_IN_LOOP, TMA)
    for n0 in tl.range(full_end, hi, BLOCK_N, disable_licm=True):         # the partial tile
        acc0, acc1, acc2, acc3, m_i, l_i = _mla_chunk_tile(
            acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, q_rope, QRow, QRRow, KV, DescLat,
            DescRope, pt, n0, hi, PAGE_SIZE, stride_kv, scale_log2, row_ok, L, R, BLOCK_R, CH,
            NC, BLOCK_N, True, EVEN_H, EVEN_R, Q_IN_LOOP, TMA)
    l_safe = tl.where(l_i > 0, l_i, 1.0)                                  # [M]; empty: out 0
    ch = tl.arange(0, CH)
    ORow = Out + b64 * stride_ob + head[:, None] * stride_oh               # [M, 1] pointers
    PRow = PartO + b64 * stride_pot + head[:, None] * stride_poh + split * stride_pos
    # an empty split writes only its lse (-inf); [M] (the interpreter rejects a scalar & [M])
    keep = row_ok & (tl.zeros([G_BLK], dtype=tl.int32) + (hi - lo) > 0)
    _store_chunk(acc0, 0 * CH, l_safe, ORow, PRow, ch, row_ok, keep, num_splits, EVEN_H)
    if NC >= 2:
        _store_chunk(acc1, 1 * CH, l_safe, ORow, PRow, ch, row_ok, keep, num_splits, EVEN_H)
    if NC >= 4:
        _store_chunk(acc2, 2 * CH, l_safe, ORow, PRow, ch, row_ok, keep, num_splits, EVEN_H)
        _store_chunk(acc3, 3 * CH, l_safe, ORow, PRow, ch, row_ok, keep, num_splits, EVEN_H)
    if num_splits > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))     # [M]
        tl.store(PartL + b64 * stride_plt + head * stride_plh + split, lse, mask=row_ok)


def _valid_chunk(lat: int, nc: int) -> bool:
    ch = lat // nc
    return lat % nc == 0 and pow2_dim(ch)


def default_nc(lat: int) -> int:
    """The most chunks (4, 2, 1) whose chunk is a power of two >= 16; 0 when none is."""
    return next((nc for nc in (4, 2, 1) if _valid_chunk(lat, nc)), 0)


def tma_supported(kv_cache: torch.Tensor, page_size: int, block_n: int, rope: int) -> bool:
    """Whole KV tiles can be copied by tensor descriptors: a tile lies in one page, the rope
    block is exact, rows are 16-byte aligned, and the GPU has TMA (sm_90+; the interpreter
    emulates it)."""
    return (page_size % block_n == 0 and pow2_dim(rope) and tma_rows_ok(kv_cache)
            and has_tma(kv_cache))


def mla_decode_chunked(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                       page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                       scale: float, num_splits: int | None = None, nc: int | None = None,
                       block_n: int | None = None, num_warps: int | None = None,
                       num_stages: int | None = None, q_in_loop: bool | None = None,
                       g_blk: int | None = None, max_regs: int | None = None,
                       split_tiles: int | None = None, tma: bool | None = None,
                       sizing: SplitSizing = DEFAULT_SIZING,
                       w_uv: torch.Tensor | None = None) -> torch.Tensor:
    """q_latent: [B, H, L], q_rope: [B, H, R], kv_cache: [S, L+R], page_table: [B, P] int32,
    seq_lens: [B] int32 -> [B, H, L] (q_latent's dtype). Rows with seq_len 0 give zeros.
    w_uv: [H, L, Dv] or None: the output projected per head, [B, H, Dv] (the `mla_decode` op's
    contract); one split token's merge then runs inside the projection (`merged_head_gemv`).

    Tuning knobs (None: defaults): num_splits (split-KV pieces; None: from `sizing`), nc
    (latent chunks, 1/2/4), block_n (keys per tile), num_warps, num_stages, q_in_loop (load
    the query chunks and q_rope every tile, True, or once before the KV loop), g_blk (heads
    per program, a power of two >= 16), max_regs (ptxas register cap per thread, Triton's
    maxnreg; None: uncapped), split_tiles (fewest KV tiles per split; None: from `sizing`), tma
    (tensor-descriptor copies of whole tiles; None: wherever `tma_supported` allows)."""
    check(q_latent.dim() == 3 and q_rope.dim() == 3 and kv_cache.dim() == 2,
          "q_latent [B, H, L], q_rope [B, H, R], kv_cache [S, L+R] expected")
    bsz, heads, lat = q_latent.shape
    rope = q_rope.shape[-1]
    check(q_rope.shape[:2] == (bsz, heads), "q_rope must be [B, H, R] like q_latent")
    check(kv_cache.shape[1] == lat + rope, f"kv_cache width {kv_cache.shape[1]} != L+R "
          f"{lat + rope}")
    check(q_latent.dtype == q_rope.dtype == kv_cache.dtype, "q and cache dtypes differ")
    check(q_latent.stride(-1) == 1 and q_rope.stride(-1) == 1 and kv_cache.stride(-1) == 1,
          "last dimensions must be contiguous")
    check(page_table.dim() == 2 and page_table.shape[0] == bsz and seq_lens.shape == (bsz,),
          "page_table must be [B, P] with seq_lens [B]")
    check(page_table.dtype == torch.int32 and seq_lens.dtype == torch.int32,
          "page_table and seq_lens must be int32")
    check(page_size >= 1, "page_size must be positive")
    nc = default_nc(lat) if nc is None else nc
    check(nc in (1, 2, 4) and _valid_chunk(lat, nc),
          f"latent {lat} in {nc} chunks: need nc in (1, 2, 4) and L/nc a power of two >= 16")
    small = interpreting()
    block_n = (16 if small else 64) if block_n is None else block_n
    check(pow2_dim(block_n), "block_n: a power of two >= 16")
    g_blk = G_BLK_DEFAULT if g_blk is None else g_blk
    check(pow2_dim(g_blk), "g_blk: a power of two >= 16")
    num_warps = 4 if num_warps is None else num_warps
    num_stages = 2 if num_stages is None else num_stages
    q_in_loop = False if q_in_loop is None else bool(q_in_loop)
    out = torch.empty(bsz, heads, lat, dtype=q_latent.dtype, device=q_latent.device)  # [B,H,L]
    if bsz == 0 or heads == 0:
        return out
    n_hblk = triton.cdiv(heads, g_blk)
    max_len = page_table.shape[1] * page_size
    if num_splits is None:
        num_splits = sizing.decode_splits(bsz * n_hblk, max_len, block_n, q_latent.device, True)
    if split_tiles is None:
        split_tiles = sizing.tiles_per_split(bsz * n_hblk, True)
    check(split_tiles >= 1, "split_tiles must be >= 1")
    check(num_splits >= 1, "num_splits must be >= 1")
    part_o, part_l = split_buffers(out.shape, num_splits, out)     # [B, H, S, L], [B, H, S]
    block_r = max(16, next_pow2(rope))
    tma_ok = tma_supported(kv_cache, page_size, block_n, rope)
    tma = tma_ok if tma is None else bool(tma)
    check(tma_ok or not tma, "tma needs sm_90+ (or the interpreter), page_size % block_n == 0, "
          "a power-of-two rope >= 16 and 16-byte aligned cache rows")
    desc_lat, desc_rope = ((TensorDescriptor.from_tensor(kv_cache, [block_n, lat // nc]),
                            TensorDescriptor.from_tensor(kv_cache, [block_n, block_r]))
                           if tma else (kv_cache, kv_cache))
    _mla_decode_chunked_kernel[(bsz, n_hblk, num_splits)](
        q_latent, q_rope, kv_cache, desc_lat, desc_rope, out, part_o, part_l, page_table,
        seq_lens,
        scale * math.log2(math.e), heads, split_tiles * block_n, num_splits,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), page_table.stride(0), out.stride(0), out.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2) if num_splits > 1 else 0,
        part_l.stride(0), part_l.stride(1),
        L=lat, R=rope, BLOCK_R=block_r, CH=lat // nc, NC=nc, G_BLK=g_blk, BLOCK_N=block_n,
        EVEN_H=heads % g_blk == 0, EVEN_R=rope == block_r,
        Q_IN_LOOP=q_in_loop, TMA=tma, PAGE_SIZE=page_size, num_warps=num_warps,
        num_stages=num_stages, **pdl_launch(out.device),
        **({} if max_regs is None else dict(maxnreg=max_regs)))
    if w_uv is not None and num_splits > 1 and MERGE_INTO_PROJECTION \
            and merged_head_gemv_applies(part_o, w_uv, out.dtype):
        return merged_head_gemv(part_o, part_l, w_uv)
    if num_splits > 1:
        merge_splits(part_o, part_l, out)
    return out if w_uv is None else head_matmul(out, w_uv)


def mla_extend_per_token(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                         page_table: torch.Tensor, query_start: torch.Tensor,
                         seq_lens: torch.Tensor, page_size: int, scale: float) -> torch.Tensor:
    """mla_extend (q_latent [T, H, L], q_rope [T, H, R] -> [T, H, L], causal) as T decode rows:
    token i of row b is a row of its own over row b's pages, seeing the keys up to its own
    position. For launches of a few tokens (verify rows): each row's keys are read once per
    token (the repeats from L2), but every program is the register-lean decode one, where the
    generic extend kernel holds 4 tokens x the heads in one 64-row tile, mostly empty."""
    table, lens = token_rows(query_start, seq_lens, page_table, q_latent.shape[0])
    return mla_decode_chunked(q_latent, q_rope, kv_cache, table, lens, page_size, scale)


def token_rows(query_start: torch.Tensor, seq_lens: torch.Tensor, page_table: torch.Tensor,
               num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of the `num_tokens` extend tokens as a decode row: its row's page table [T, P]
    int32 and its key count [T] int32 (the row's keys before it, itself included), on the
    device without a host sync; computed once per step (kernels/step_memo.py)."""
    return memoized(("mla_token_rows", num_tokens), (query_start, seq_lens, page_table),
                    lambda: _token_rows(query_start, seq_lens, page_table, num_tokens))


def _token_rows(query_start: torch.Tensor, seq_lens: torch.Tensor, page_table: torch.Tensor,
                num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    ends = query_start[1:].long()                                         # [B]
    tok = torch.arange(num_tokens, device=query_start.device)             # [T]
    row = torch.searchsorted(ends, tok, right=True).clamp_(max=ends.shape[0] - 1)  # [T]
    # token i of a row ending at e sits at key position seq_len - (e - i)
    lens = (seq_lens.long()[row] - ends[row] + tok + 1).clamp_(min=0)    # [T]
    return page_table[row], lens.to(torch.int32)
