"""Paged attention in Triton: one kernel serves GQA decode/extend and MLA decode/extend.

Each program owns BLOCK_M = BLOCK_T x G_BLK query rows: BLOCK_T consecutive query tokens of one
sequence times G_BLK query heads that share one KV head (GQA group, or all MLA heads, which
share the single latent head). Folding tokens and heads into M makes the tensor-core tile full
when heads are few and reads each KV tile once for the whole group. The KV range of a program
may be cut into num_splits pieces (split-KV, for long contexts with few rows); a second kernel
merges the pieces by their log-sum-exp. Keys are gathered per token through the page table,
so any page size works. Scores: q1.k1 (+ q2.k2 for MLA's rope part); values: V, or k1 itself
when SHARED_V (MLA: the latent is both key and value).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton.common import check, interpreting, next_pow2, num_sms, per_batch, pow2_dim


@triton.jit
def _load_rows(Base, slot, stride_s, d, D: tl.constexpr, n_ok, PRED: tl.constexpr):
    """Gathered rows Base[slot[n], d] -> [N, BLOCK_D]; predicated only when PRED."""
    ptrs = Base + slot[:, None] * stride_s + d[None, :]
    if PRED:
        return tl.load(ptrs, mask=n_ok[:, None] & (d[None, :] < D), other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _split_range(split, kv_len, min_split_len, num_splits, SPLIT: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of one split-KV piece: the row's own length cut into num_splits runs of
    whole tiles, each at least min_split_len keys (a multiple of BLOCK_N). Sizing by the row
    (not the page table's width, which CUDA graphs pad to the longest servable sequence) keeps
    a short row spread over several splits; the splits past its end are empty."""
    if not SPLIT:
        return kv_len * 0, kv_len
    split_len = tl.maximum(tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N,
                           min_split_len)
    lo = split * split_len
    return lo, tl.minimum(lo + split_len, kv_len)


@triton.jit
def _extend_block(pid_q, BlockBatch, BlockTok, QueryStart):
    """An extend program's (valid, row b, first token t0, row's first query q_start, row's
    query count qlen; qlen 0 for a spare program), from the `_block_map` tensors. Longest
    programs first: the block map ascends in tokens (later tokens see more keys) and programs
    start in id order, so program ids are reversed to shrink the causal tail."""
    blk = tl.num_programs(0) - 1 - pid_q
    b_raw = tl.load(BlockBatch + blk)
    valid = b_raw >= 0
    b = tl.maximum(b_raw, 0)
    t0 = tl.where(valid, tl.load(BlockTok + blk), 0)
    q_start = tl.load(QueryStart + b)
    qlen = tl.where(valid, tl.load(QueryStart + b + 1) - q_start, 0)
    return valid, b, t0, q_start, qlen


@triton.jit
def _attn_tile(acc, m_i, l_i, q1, q2, K1, K2, V, PageTable, n0, hi, pos, kvh, page_size,
               stride_k1s, stride_k1h, stride_k2s, stride_k2h, stride_vs, stride_vh, scale_log2,
               D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_D1: tl.constexpr,
               BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_D2: tl.constexpr, SHARED_V: tl.constexpr, MASKED: tl.constexpr,
               TRANS: tl.constexpr, EVEN_D: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N): gather the tile through the page
    table, score, rescale and accumulate. acc is [M, DV] (or [DV, M] when TRANS: keys on the MMA
    M axis); MASKED applies the causal and bounds masks (diagonal and last tiles only)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)                                   # [N]
    n_ok = offs_n < hi
    d1 = tl.arange(0, BLOCK_D1)
    PRED: tl.constexpr = MASKED or not EVEN_D
    if PRED:
        page = tl.load(PageTable + offs_n // page_size, mask=n_ok, other=0)  # [N]
        slot = page.to(tl.int64) * page_size + offs_n % page_size            # [N]
        k1 = tl.load(K1 + slot[:, None] * stride_k1s + kvh * stride_k1h + d1[None, :],
                     mask=n_ok[:, None] & (d1[None, :] < D1), other=0.0)   # [N, D1]
    else:  # interior tile of power-of-two heads: no predicates
        page = tl.load(PageTable + offs_n // page_size)                      # [N]
        slot = page.to(tl.int64) * page_size + offs_n % page_size            # [N]
        k1 = tl.load(K1 + slot[:, None] * stride_k1s + kvh * stride_k1h + d1[None, :])
    if TRANS:
        # keys on the M axis (tensor-core tile full with few heads): s^T = K q^T
        st = tl.dot(k1, tl.trans(q1))                                      # [N, M]
        if HAS_D2:
            d2 = tl.arange(0, BLOCK_D2)
            k2 = _load_rows(K2 + kvh * stride_k2h, slot, stride_k2s, d2, D2, n_ok, PRED)  # [N, D2]
            st += tl.dot(k2, tl.trans(q2))
        st = st * scale_log2
        if MASKED:
            vis = (offs_n[:, None] <= pos[None, :]) & n_ok[:, None]        # [N, M]
            st = tl.where(vis, st, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(st, 0))                             # [M]
        pt = tl.exp2(st - m_new[None, :])                                  # [N, M]
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pt, 0)
        if SHARED_V:
            v = k1
        else:
            dv = tl.arange(0, BLOCK_DV)
            v = _load_rows(V + kvh * stride_vh, slot, stride_vs, dv, DV, n_ok, PRED)  # [N, DV]
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), pt.to(v.dtype))   # [DV, M]
    else:
        qk = tl.dot(q1, tl.trans(k1))                                          # [M, N]
        if HAS_D2:
            d2 = tl.arange(0, BLOCK_D2)
            k2 = _load_rows(K2 + kvh * stride_k2h, slot, stride_k2s, d2, D2, n_ok, PRED)  # [N, D2]
            qk += tl.dot(q2, tl.trans(k2))
        qk = qk * scale_log2
        if MASKED:
            vis = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]            # [M, N]
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))                                 # [M]
        p = tl.exp2(qk - m_new[:, None])                                       # [M, N]
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if SHARED_V:
            v = k1                                                             # [N, DV]
        else:
            dv = tl.arange(0, BLOCK_DV)
            v = _load_rows(V + kvh * stride_vh, slot, stride_vs, dv, DV, n_ok, PRED)  # [N, DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


# The batch's metadata (per-batch views and slices) and the split partials' strides (they
# scale with the split count): not specialized, see common.per_batch
BATCH_META = ("PageTable", "QueryStart", "SeqLens", "BlockBatch", "BlockTok")
SPLIT_INTS = ("num_splits", "stride_pot", "stride_poh", "stride_plt", "stride_plh")


@triton.jit(**per_batch(ints=SPLIT_INTS + ("stride_pt",), pointers=BATCH_META))
def _paged_attn_kernel(
        Q1, Q2, K1, K2, V, Out, PartO, PartL,
        PageTable, QueryStart, SeqLens, BlockBatch, BlockTok,
        scale_log2, page_size, group, min_split_len, num_splits,
        stride_q1t, stride_q1h, stride_q2t, stride_q2h,
        stride_k1s, stride_k1h, stride_k2s, stride_k2h, stride_vs, stride_vh,
        stride_ot, stride_oh, stride_pt, stride_pot, stride_poh, stride_pos,
        stride_plt, stride_plh,
        D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_D1: tl.constexpr,
        BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, G_BLK: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, N_HBLK: tl.constexpr,
        SPLIT: tl.constexpr, HAS_D2: tl.constexpr, SHARED_V: tl.constexpr,
        DECODE: tl.constexpr, TRANS: tl.constexpr, EVEN_D: tl.constexpr):
    BLOCK_M: tl.constexpr = BLOCK_T * G_BLK
    pid_q, pid_h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh, hb = pid_h // N_HBLK, pid_h % N_HBLK
    if DECODE:
        b = pid_q
        t0 = 0
        q_start = pid_q
        qlen = 1
        seq_len = tl.load(SeqLens + b)
        kv_end = seq_len
    else:
        valid, b, t0, q_start, qlen = _extend_block(pid_q, BlockBatch, BlockTok, QueryStart)
        seq_len = tl.load(SeqLens + b)
        kv_end = tl.where(valid, seq_len - qlen + tl.minimum(t0 + BLOCK_T, qlen), 0)
    r = tl.arange(0, BLOCK_M)
    t_rel = t0 + r // G_BLK                                               # [M] token in row
    hg = hb * G_BLK + r % G_BLK                                           # [M] head in group
    head = kvh * group + hg
    row_ok = (t_rel < qlen) & (hg < group)
    pos = seq_len - qlen + t_rel                                          # [M] query position
    tok = (q_start + t_rel).to(tl.int64)
    d1 = tl.arange(0, BLOCK_D1)
    q1 = tl.load(Q1 + tok[:, None] * stride_q1t + head[:, None] * stride_q1h + d1[None, :],
                 mask=row_ok[:, None] & (d1[None, :] < D1), other=0.0)    # [M, D1]
    if HAS_D2:
        d2 = tl.arange(0, BLOCK_D2)
        q2 = tl.load(Q2 + tok[:, None] * stride_q2t + head[:, None] * stride_q2h + d2[None, :],
                     mask=row_ok[:, None] & (d2[None, :] < D2), other=0.0)  # [M, D2]
    else:
        q2 = q1
    lo, hi = _split_range(split, kv_end, min_split_len, num_splits, SPLIT, BLOCK_N)
    first_pos = seq_len - qlen + t0                      # keys <= first_pos are seen by all rows
    full_end = lo + tl.maximum(tl.minimum(hi, first_pos + 1) - lo, 0) // BLOCK_N * BLOCK_N
    if TRANS:
        acc = tl.zeros([BLOCK_DV, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pt = PageTable + b.to(tl.int64) * stride_pt
    for n0 in range(lo, full_end, BLOCK_N):
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q1, q2, K1, K2, V, pt, n0, hi, pos, kvh,
                                   page_size, stride_k1s, stride_k1h, stride_k2s, stride_k2h,
                                   stride_vs, stride_vh, scale_log2, D1, D2, DV, BLOCK_D1,
                                   BLOCK_D2, BLOCK_DV, BLOCK_N, HAS_D2, SHARED_V, False, TRANS,
                                   EVEN_D)
    for n0 in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q1, q2, K1, K2, V, pt, n0, hi, pos, kvh,
                                   page_size, stride_k1s, stride_k1h, stride_k2s, stride_k2h,
                                   stride_vs, stride_vh, scale_log2, D1, D2, DV, BLOCK_D1,
                                   BLOCK_D2, BLOCK_DV, BLOCK_N, HAS_D2, SHARED_V, True, TRANS,
                                   EVEN_D)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if TRANS:
        out = tl.trans(acc) / l_safe[:, None]                             # [M, DV]
    else:
        out = acc / l_safe[:, None]                                       # [M, DV]
    dv = tl.arange(0, BLOCK_DV)
    omask = row_ok[:, None] & (dv[None, :] < DV)
    if not SPLIT:
        tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
                 out.to(Out.dtype.element_ty), mask=omask)
    else:  # an empty split writes only its lse (-inf): the merge stops before it. The mask is
        # built as a [M] vector: the interpreter rejects a scalar & vector mask
        tl.store(PartO + tok[:, None] * stride_pot + head[:, None] * stride_poh
                 + split * stride_pos + dv[None, :], out,
                 mask=omask & (tl.zeros([BLOCK_M], dtype=tl.int32) + (hi - lo) > 0)[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))     # [M]
        tl.store(PartL + tok * stride_plt + head * stride_plh + split, lse, mask=row_ok)


@triton.jit(**per_batch(ints=SPLIT_INTS))
def _merge_splits_kernel(PartO, PartL, Out, num_splits, stride_pot, stride_poh, stride_pos,
                         stride_plt, stride_plh, stride_ot, stride_oh, DV: tl.constexpr,
                         BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr):
    """Out[t, h, cols] = sum_s exp2(lse_s - m) PartO[t, h, s, cols] / sum_s exp2(lse_s - m).
    Splits are read CHUNK_S at a time so that many loads are in flight at once, up to the
    row's last non-empty split (non-empty splits are a prefix; empty ones wrote no partial)."""
    t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    s = tl.arange(0, BLOCK_S)
    lse_row = PartL + t * stride_plt + h * stride_plh
    lse = tl.load(lse_row + s, mask=s < num_splits, other=float("-inf"))   # [S]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.exp2(lse - m), 0)
    used = tl.max(tl.where(lse > float("-inf"), s + 1, 0), 0)                # splits with keys
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    c = tl.arange(0, CHUNK_S)
    part = PartO + t * stride_pot + h * stride_poh
    for s0 in range(0, used, CHUNK_S):
        ok = s0 + c < used
        w = tl.exp2(tl.load(lse_row + s0 + c, mask=ok, other=float("-inf")) - m)    # [C]
        p = tl.load(part + (s0 + c)[:, None] * stride_pos + dv[None, :],
                    mask=ok[:, None] & (dv[None, :] < DV), other=0.0)            # [C, DV]
        acc += tl.sum(p * w[:, None], 0)
    out = acc / tl.where(den > 0, den, 1.0)
    tl.store(Out + t * stride_ot + h * stride_oh + dv, out.to(Out.dtype.element_ty), mask=dv < DV)


def _block_map(query_start: torch.Tensor, num_tokens: int, block_t: int
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map program ids to (row, first token) without a host sync.

    query_start: [B+1] -> BlockBatch [NB] (-1 for spare programs), BlockTok [NB], NB."""
    b = query_start.shape[0] - 1
    nb = triton.cdiv(num_tokens, block_t) + b                         # upper bound on blocks
    qs = query_start.long()
    nblk = (qs[1:] - qs[:-1] + block_t - 1) // block_t                  # [B]
    cum = torch.cumsum(nblk, 0)                                         # [B]
    pid = torch.arange(nb, device=qs.device)                            # [NB]
    row = torch.searchsorted(cum, pid, right=True)                      # [NB] in [0, B]
    rowc = row.clamp(max=b - 1)
    tok = (pid - (cum[rowc] - nblk[rowc])) * block_t
    return torch.where(row < b, row, -1).to(torch.int32), tok.to(torch.int32), nb


def _config(decode: bool, mla: bool, group: int) -> dict:
    """Tile sizes (G_BLK, BLOCK_T, BLOCK_N, num_warps, num_stages; TRANS optional), the best of
    `scripts/bench_kernels.py --tune` on H200; tiny tiles under the CPU interpreter."""
    small = interpreting()
    if decode:
        g_blk = min(max(16, next_pow2(group)), 64)
        return dict(G_BLK=g_blk, BLOCK_T=1, BLOCK_N=16 if small else (32 if mla else 64),
                    num_warps=4, num_stages=2)
    g_blk = min(next_pow2(group), 16 if small else 64)
    rows = 16 if small else (64 if mla else (256 if g_blk >= 2 else 128))
    g_blk = min(g_blk, rows)
    return dict(G_BLK=g_blk, BLOCK_T=rows // g_blk, BLOCK_N=16 if small else (32 if mla else 64),
                num_warps=4 if small else 8, num_stages=2 if mla else 3)


# split-KV sizing: decode fills one wave (floor). GQA wants ~4 resident programs per SM (more
# splits add a partial second wave; scripts/bench_kernels.py --tune, H200). MLA wants ~2 (its
# register-bound residency): each split writes a 32 KB fp32 partial that the merge reads back.
# --tune-splits (B=1..256 x 4K..32K): 2 per SM is the best fixed count or within 2 points of it
# on an H200; on an H100 within 4 points, but for B=128 x 4K (82% of copy vs 91% unsplit). The
# earlier 8 per SM (ceil) ran up to 1.4x slower (H200, B=8 x 4K: 32.9 vs 24.1 us).
SPLITS_PER_SM = {"gqa": 4, "mla": 2}
MIN_SPLIT_TILES = 4    # an MLA split covers at least this many KV tiles (few programs: fewer)
FINE_SPLIT_PROGRAMS = 4
EXTEND_WAVE = 1.25    # extend launches split up to this many programs per SM
MAX_EXTEND_SPLITS = 32


def min_split_tiles(programs: int, mla: bool) -> int:
    """Fewest KV tiles per split. An MLA split writes an fp32 [16, 512] partial (32 KB, the
    merge reads it back) per 73 KB KV tile, so with many programs splits keep MIN_SPLIT_TILES
    tiles; with few, a short row is better spread thin. A GQA partial is small (2 KB per 32 KB
    tile): one tile always. From 32K-wide tables on an H200 (short rows, as CUDA graphs pad):
    MLA B=1 ctx=1024 10.8 us at 1 tile vs 20.0 at 4; B=16 ctx=4096 60.9 vs 48.5."""
    if not mla or programs <= FINE_SPLIT_PROGRAMS:
        return 1
    return 2 if programs <= 4 * FINE_SPLIT_PROGRAMS else MIN_SPLIT_TILES


def _num_splits(programs: int, max_len: int, block_n: int, device: torch.device,
                mla: bool) -> int:
    """Splits per (row, head block) for decode: SPLITS_PER_SM programs per SM in one wave
    (floor), each split at least MIN_SPLIT_TILES KV tiles of the page table's width."""
    want = SPLITS_PER_SM["mla" if mla else "gqa"] * num_sms(device) // programs
    return int(max(1, min(want, _most_splits(max_len, block_n), 256)))


def _extend_splits(programs: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Splits per extend program: as many as keep the launch within EXTEND_WAVE programs per
    SM (floor), each split at least MIN_SPLIT_TILES KV tiles; 1 from EXTEND_WAVE / 2 programs
    per SM up. Few new tokens over a long prefix are what split (a decompressed MLA prefill of
    64-512 tokens is 16 heads x 1-4 query blocks). H200, 16K keys, against 1.0 / 2.0 programs
    per SM in the same run: mla_prefill 512 tokens 764 / 574 -> 489 us, Llama extend 256
    tokens 311 / 346 -> 279 us; 64-128 tokens 320-323 us (2.0: 296-300). Launches of ~140
    programs (1024 new tokens) were slower split in 2 (Llama 772 -> 936 us)."""
    return int(max(1, min(int(EXTEND_WAVE * num_sms(device)) // programs,
                          _most_splits(max_len, block_n), MAX_EXTEND_SPLITS)))


def _most_splits(max_len: int, block_n: int) -> int:
    """Splits of at least MIN_SPLIT_TILES tiles that a page table max_len keys wide holds."""
    return max(1, max_len // (MIN_SPLIT_TILES * block_n))


def paged_attention(q1: torch.Tensor, q2: torch.Tensor | None, k1: torch.Tensor,
                    k2: torch.Tensor | None, v: torch.Tensor | None, page_table: torch.Tensor,
                    query_start: torch.Tensor | None, seq_lens: torch.Tensor, page_size: int,
                    scale: float, num_splits: int | None = None, split_tiles: int | None = None
                    ) -> torch.Tensor:
    """q1: [T, Hq, D1], q2: [T, Hq, D2] | None, k1: [S, Hk, D1], k2: [S, Hk, D2] | None,
    v: [S, Hk, DV] | None (None: values are k1) -> [T, Hq, DV]. query_start None: decode.
    num_splits / split_tiles (fewest KV tiles per split): None for the sizing rules below."""
    t, hq, d1 = q1.shape
    hk = k1.shape[1]
    check(hq % hk == 0, f"query heads {hq} not a multiple of kv heads {hk}")
    check(page_table.dim() == 2 and seq_lens.shape[0] == page_table.shape[0],
          "page_table must be [B, P] with seq_lens [B]")
    group, decode, shared_v = hq // hk, query_start is None, v is None
    vv = k1 if shared_v else v
    dv = vv.shape[-1]
    d2 = q2.shape[-1] if q2 is not None else 0
    cfg = _config(decode, shared_v, group)   # MLA's absorbed form: wide latent tiles
    g_blk, block_t, block_n = cfg["G_BLK"], cfg["BLOCK_T"], cfg["BLOCK_N"]
    n_hblk = triton.cdiv(group, g_blk)
    max_len = page_table.shape[1] * page_size
    if decode:
        check(t == seq_lens.shape[0], "decode: q must have one row per sequence")
        nb, bb, bt, qs = t, seq_lens, seq_lens, seq_lens
    else:
        bb, bt, nb = _block_map(query_start, t, block_t)
        qs = query_start
    programs = nb * hk * n_hblk
    if num_splits is None:
        num_splits = (_num_splits(programs, max_len, block_n, q1.device, shared_v) if decode
                      else _extend_splits(programs, max_len, block_n, q1.device))
    split_tiles = (min_split_tiles(programs, shared_v) if split_tiles is None
                   else split_tiles)
    check(split_tiles >= 1, "split_tiles must be >= 1")
    out = torch.empty(t, hq, dv, dtype=q1.dtype, device=q1.device)          # [T, Hq, DV]
    if num_splits > 1:
        part_o = torch.empty(t, hq, num_splits, dv, dtype=torch.float32, device=q1.device)
        part_l = torch.empty(t, hq, num_splits, dtype=torch.float32, device=q1.device)
    else:
        part_o, part_l = out, out
    q2_, k2_ = (q2, k2) if q2 is not None else (q1, k1)
    grid = (nb, hk * n_hblk, num_splits)
    _paged_attn_kernel[grid](
        q1, q2_, k1, k2_, vv, out, part_o, part_l, page_table, qs, seq_lens, bb, bt,
        scale * math.log2(math.e), page_size, group, split_tiles * block_n, num_splits,
        q1.stride(0), q1.stride(1), q2_.stride(0), q2_.stride(1),
        k1.stride(0), k1.stride(1), k2_.stride(0), k2_.stride(1), vv.stride(0), vv.stride(1),
        out.stride(0), out.stride(1), page_table.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2) if num_splits > 1 else 0,
        part_l.stride(0), part_l.stride(1),
        D1=d1, D2=d2, DV=dv, BLOCK_D1=max(16, next_pow2(d1)), BLOCK_D2=max(16, next_pow2(d2)),
        BLOCK_DV=max(16, next_pow2(dv)), G_BLK=g_blk, BLOCK_T=block_t, BLOCK_N=block_n,
        N_HBLK=n_hblk, SPLIT=num_splits > 1, HAS_D2=q2 is not None, SHARED_V=shared_v,
        DECODE=decode, TRANS=cfg.get("TRANS", False),
        EVEN_D=all(pow2_dim(x) for x in (d1, dv) + ((d2,) if d2 else ())),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    if num_splits > 1:
        merge_splits(part_o, part_l, out)
    return out


MERGE_TILE_ELEMS = 4096    # fp32 partial-output elements one merge load brings in (16 KB)
MERGE_MIN_SPLITS = 256     # narrowest lse vector of the merge: one variant up to 256 splits


def _merge_tiles(rows: int, dv: int, num_splits: int, device: torch.device
                 ) -> tuple[int, int, int]:
    """(BLOCK_DV, BLOCK_S, CHUNK_S) of the split merge. With few rows (batch-1 decode: one
    program per head and column block) the merge is latency-bound: each program's chunks are
    serial loads. So column blocks narrow until there are ~2 programs per SM, and each load
    takes as many splits as fit MERGE_TILE_ELEMS (B=1 MLA, 16 heads x 512 columns x 128
    splits: 4 serial loads per program at 128-column blocks, 1 at 16-column blocks over 8x
    more programs). BLOCK_S (the lse vector) is at least MERGE_MIN_SPLITS wide (the split
    sizing's cap), so eager batches of any split count share one compiled variant per
    BLOCK_DV."""
    block_dv = min(128, max(16, next_pow2(dv)))
    while block_dv > 16 and rows * triton.cdiv(dv, block_dv) < 2 * num_sms(device):
        block_dv //= 2
    block_s = max(MERGE_MIN_SPLITS, next_pow2(num_splits))
    return block_dv, block_s, min(block_s, max(2, MERGE_TILE_ELEMS // block_dv))


def merge_splits(part_o: torch.Tensor, part_l: torch.Tensor, out: torch.Tensor) -> None:
    """part_o: [T, H, S, DV] fp32, part_l: [T, H, S] log2-sum-exp -> out [T, H, DV] (in place)."""
    t, h, num_splits, dv = part_o.shape
    block_dv, block_s, chunk_s = _merge_tiles(t * h, dv, num_splits, part_o.device)
    _merge_splits_kernel[(t, h, triton.cdiv(dv, block_dv))](
        part_o, part_l, out, num_splits, part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_l.stride(0), part_l.stride(1), out.stride(0), out.stride(1), DV=dv,
        BLOCK_DV=block_dv, BLOCK_S=block_s, CHUNK_S=chunk_s, num_warps=4)
