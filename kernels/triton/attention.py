"""Paged attention in Triton: one kernel serves GQA decode/extend and MLA decode/extend.

Each program owns BLOCK_M = BLOCK_T x G_BLK query rows: BLOCK_T consecutive query tokens of one
sequence times G_BLK query heads that share one KV head (GQA group, or all MLA heads, which
share the single latent head). Folding tokens and heads into M makes the tensor-core tile full
when heads are few and reads each KV tile once for the whole group. The KV range of a program
may be cut into num_splits pieces (split_kv.py, for long contexts with few rows). Keys are
gathered per token through the page table (paged_tiles.py), so any page size works. Scores:
q1.k1 (+ q2.k2 for MLA's rope part); values: V, or k1 itself when SHARED_V (MLA: the latent
is both key and value). Interior tiles (every key visible to every row of the program) run
without masks; only the diagonal and last tiles are masked.

GPT-OSS options (constexpr-gated, so the default variant compiles as before): WINDOW > 0
starts a program's keys at its first row's window (position - WINDOW + 1), every tile masked
(a window is a few tiles), and never reads a slot before it; HAS_SINKS adds each head's sink
logit to the softmax's denominator (in the split merge when the keys are split).

FP8 caches (e4m3) take the same kernel: tiles are cast to the query's dtype as they load
(paged_tiles.attn_tile), k_scale is folded into the score scale on the host and v_scale
multiplies each program's output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton.common import check, interpreting, next_pow2, per_batch, pow2_dim
from kernels.triton.paged_tiles import (BATCH_META, add_sink, attn_range, block_map,
                                        check_e4m3_words, extend_block)
from kernels.triton.pdl import pdl_begin, pdl_launch
from kernels.triton.split_kv import (DEFAULT_SIZING, SPLIT_INTS, SplitSizing, merge_splits,
                                     split_buffers, split_range)


@triton.jit(**per_batch(ints=SPLIT_INTS + ("stride_pt",), pointers=BATCH_META))
def _paged_attn_kernel(
        Q1, Q2, K1, K2, V, Out, PartO, PartL, Sinks,
        PageTable, QueryStart, SeqLens, BlockBatch, BlockTok,
        scale_log2, v_scale, group, min_split_len, num_splits,
        stride_q1t, stride_q1h, stride_q2t, stride_q2h,
        stride_k1s, stride_k1h, stride_k2s, stride_k2h, stride_vs, stride_vh,
        stride_ot, stride_oh, stride_pt, stride_pot, stride_poh, stride_pos,
        stride_plt, stride_plh,
        D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_D1: tl.constexpr,
        BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, G_BLK: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, N_HBLK: tl.constexpr,
        HAS_D2: tl.constexpr, SHARED_V: tl.constexpr,
        DECODE: tl.constexpr, EVEN_D: tl.constexpr, WINDOW: tl.constexpr,
        HAS_SINKS: tl.constexpr, PAGE_SIZE: tl.constexpr, V_WORDS: tl.constexpr,
        PDL: tl.constexpr):
    pdl_begin(PDL)
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
        valid, b, t0, q_start, qlen = extend_block(pid_q, BlockBatch, BlockTok, QueryStart)
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
    if K1.dtype.element_ty == tl.float8e4nv and Q1.dtype.element_ty == tl.bfloat16:
        # attn_tile casts each tile to q's dtype: e4m3 -> fp16 is one cvt a pair, -> bf16 is
        # not; bf16 -> fp16 is exact for |q| within fp16's range (65504)
        q1 = q1.to(tl.float16)
        q2 = q2.to(tl.float16)
    first_pos = seq_len - qlen + t0                      # keys <= first_pos are seen by all rows
    # A one-token row of an extend launch (a decode row in a 16-bit cache's extend graph) keeps
    # its keys whole, in its first split: such rows come many to a launch whose split count is
    # sized for its chunk, and split they overfill the SMs (docs/KERNELS.md, "Short chunks").
    splits = num_splits
    if not DECODE:
        splits = tl.where(qlen == 1, 1, num_splits)
    if WINDOW > 0:  # keys from the first row's window on, every tile masked
        kv_start = tl.maximum(first_pos - WINDOW + 1, 0)
        lo, hi = split_range(split, tl.maximum(kv_end - kv_start, 0), min_split_len, splits,
                             BLOCK_N)
        lo, hi = lo + kv_start, hi + kv_start
        full_end = lo
    else:
        lo, hi = split_range(split, kv_end, min_split_len, splits, BLOCK_N)
        full_end = lo + tl.maximum(tl.minimum(hi, first_pos + 1) - lo, 0) // BLOCK_N * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pt = PageTable + b.to(tl.int64) * stride_pt
    acc, m_i, l_i = attn_range(acc, m_i, l_i, q1, q2, K1, K2, V, pt, lo, full_end, hi, pos,
                               kvh, PAGE_SIZE, stride_k1s, stride_k1h, stride_k2s, stride_k2h,
                               stride_vs, stride_vh, scale_log2, D1, D2, DV, BLOCK_D1,
                               BLOCK_D2, BLOCK_DV, BLOCK_N, HAS_D2, SHARED_V, EVEN_D, WINDOW,
                               V_WORDS)
    if HAS_SINKS:  # split: the merge adds the sink once
        if num_splits == 1:
            l_i = add_sink(l_i, m_i, Sinks, head, row_ok)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None] * v_scale                                 # [M, DV]
    dv = tl.arange(0, BLOCK_DV)
    omask = row_ok[:, None] & (dv[None, :] < DV)
    if num_splits == 1:  # a run-time branch: one variant serves split and whole launches
        tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
                 out.to(Out.dtype.element_ty), mask=omask)
    else:  # an empty split writes only its lse (-inf): the merge stops before it. The mask is
        # built as a [M] vector: the interpreter rejects a scalar & vector mask
        tl.store(PartO + tok[:, None] * stride_pot + head[:, None] * stride_poh
                 + split * stride_pos + dv[None, :], out,
                 mask=omask & (tl.zeros([BLOCK_M], dtype=tl.int32) + (hi - lo) > 0)[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))     # [M]
        tl.store(PartL + tok * stride_plt + head * stride_plh + split, lse, mask=row_ok)


@dataclass(frozen=True)
class AttentionTiles:
    """Launch shape of the paged attention kernel: a program owns block_t query tokens x g_blk
    heads of one KV head (BLOCK_M = block_t * g_blk MMA rows) and steps over block_n keys at a
    time. split_tiles / split_wave: how a launch on these tiles splits its keys (fewest key
    tiles a split, programs an SM to fill; None: SplitSizing's)."""
    g_blk: int
    block_t: int
    block_n: int
    num_warps: int
    num_stages: int
    split_tiles: int | None = None
    split_wave: float | None = None


class ShortTile(NamedTuple):
    """The tiles of GQA extend launches of at most `most` tokens: `rows` MMA rows, and (when
    given) their keys split to fill `wave` programs an SM, each split at least `split_tiles`
    key tiles (None: SplitSizing's rule)."""
    most: int
    rows: int
    split_tiles: int | None = None
    wave: float | None = None


# Extend launches of few query tokens take small tiles: their rows are short (a verify step's
# 1 + k tokens, decode rows padded into an extend graph, a short chunk), and the prefill tile
# (256 rows) would hold a few of them and run mostly empty MMAs. From
# scripts/gpu_verify_attention.py on an H200 (Llama-3.1-8B heads, 2K-token rows;
# docs/KERNELS.md): B=1 x 2 tokens 69.6 -> 19.2 us, B=16 x 5 tokens 235 -> 83, B=64 x 5
# (384-token launch) 699 -> 194, one 256-token chunk over 16K keys 737 -> 581.
# A short chunk over a long prefix (an agent's turn beside decodes, in an extend graph) is one
# row of many tokens: from 33 to 128 tokens the 64-row tile reads each key once for 16 tokens
# where the 16-row one did for 4, and the keys split to fill 2 programs an SM, each split at
# least 32 tiles (2K keys) so that a verify step's 2K-key rows stay whole; up to 32 tokens the
# 16-row tile's keys split to fill 2 an SM. H100, us a launch, FP8 / bf16 caches, before ->
# after (docs/KERNELS.md, "Short chunks over long prefixes"): a 64-token chunk over 16K keys
# 550.5 -> 160.2 / 487.1 -> 165.4, 128 over 16K 545.8 -> 264.6, 64 over 4K 138.7 -> 82.4;
# verify rows of 5 tokens: 16 over 16K keys 609.8 -> 401.8, 16 over 2K 83.2 -> 81.5, 4 over
# 2K 46.2 -> 33.6. From 129 tokens the split rule is the extend one (1.25 programs an SM):
# with 2 an SM, one 256-token chunk over 16K gained (526.6 -> 417.2) but 16 decode rows and a
# 240-token chunk over 8K in one launch lost (312.7 -> 391.1), and a 16-bit cache's extend
# graphs run every mixed step that way.
SHORT_EXTEND_TILES: tuple[ShortTile, ...] = (ShortTile(32, 16, 1, 2.0), ShortTile(128, 64, 32, 2.0),
                                            ShortTile(512, 64))
# GQA decode over an FP8 cache with this many rows or more takes 128-key tiles, 3 stages
# (scripts/fp8kv_attention.py --sweep, H200, Llama-3.1-8B heads, 2K keys: B=256 441.9 us at
# 64 keys / 2 stages -> 397.0, bf16 499.7; B=64 152 -> 110, bf16 134.5). At B=1 they were
# slower (17.8 us against 14.6 with 64 keys): few programs, and the wider tile splits less.
FP8_WIDE_ROWS = 32
# ... and from this many rows, 2 stages, where the kernel reads its values as words
# (gqa_decode.py; paged_tiles.load_e4m3_words). A 128-key program then holds 74 KB of shared
# memory and 168 registers a thread, 3 an SM, a 64-key one 39 KB and 125, 4 an SM: the wider
# tile wins only once there are waves of programs to fill (H200, Llama-3.1-8B heads, 2K keys,
# graph replays, us, 64 -> 128 keys: B=32 64.2 -> 74.4, B=64 113.0 -> 130.4, B=128 211.9 ->
# 205.8, B=256 403.8 -> 394.8; 3 stages 398.5).
FP8_WORDS_WIDE_ROWS = 128
# GQA decode of this many rows or fewer over a 16-bit cache takes 32-key tiles: its programs
# are latency chains, and a split of 32 keys ends sooner (scripts/gpu_op_ablation.py
# --ablations gqa_tiles=32,2, H200, Llama-3.1-8B's decode graph, PDL on: B=1 4,126-4,148 ->
# 4,107 us at 256 keys, 4,191-4,205 -> 4,155 at 1K, 4,257-4,272 -> 4,243 at 4K; B=2 4,732 ->
# 4,713; B=4 4,787 -> 4,799, B=16 5,220 -> 5,372)
NARROW_DECODE_ROWS = 2


def attention_tiles(decode: bool, mla: bool, group: int, tokens: int | None = None,
                    fp8: bool = False, v_words: bool = False) -> AttentionTiles:
    """The default tiles (the best of `python -m scripts.kernel_bench tune attention`, H200;
    docs/KERNELS.md) for a launch of `tokens` query tokens (None: any). MLA's absorbed form
    takes narrower key tiles for its wide latent; GQA decode of FP8_WIDE_ROWS or more rows
    over an FP8 cache (`fp8`) wider ones: its tiles are bound by the instructions that unpack
    them, not by their bytes, and a 128-key tile spends fewer a key (FP8_WORDS_WIDE_ROWS for a
    kernel that reads its values as words: `v_words`); of NARROW_DECODE_ROWS or
    fewer over a 16-bit cache narrower ones (32 keys). Tiny tiles under the CPU
    interpreter."""
    small = interpreting()
    block_n = 16 if small else (32 if mla else 64)
    if decode:
        wide_rows = FP8_WORDS_WIDE_ROWS if v_words else FP8_WIDE_ROWS
        wide = fp8 and not (small or mla) and tokens is not None and tokens >= wide_rows
        narrow = not (fp8 or small) and tokens is not None and tokens <= NARROW_DECODE_ROWS
        return AttentionTiles(g_blk=min(max(16, next_pow2(group)), 64), block_t=1,
                              block_n=128 if wide else (32 if narrow else block_n),
                              num_warps=4, num_stages=3 if wide and not v_words else 2)
    g_blk = min(next_pow2(group), 16 if small else 64)
    short = None if mla or tokens is None else next(
        (tile for tile in SHORT_EXTEND_TILES if tokens <= tile.most), None)
    rows = 16 if small else (64 if mla else (short.rows if short else (256 if g_blk >= 2 else 128)))
    g_blk = min(g_blk, rows)
    return AttentionTiles(g_blk=g_blk, block_t=rows // g_blk, block_n=block_n,
                          num_warps=4 if small or short else 8,
                          num_stages=2 if mla or short else 3,
                          split_tiles=short.split_tiles if short else None,
                          split_wave=short.wave if short else None)


def paged_attention(q1: torch.Tensor, q2: torch.Tensor | None, k1: torch.Tensor,
                    k2: torch.Tensor | None, v: torch.Tensor | None, page_table: torch.Tensor,
                    query_start: torch.Tensor | None, seq_lens: torch.Tensor, page_size: int,
                    scale: float, num_splits: int | None = None, split_tiles: int | None = None,
                    tiles: AttentionTiles | None = None,
                    sizing: SplitSizing = DEFAULT_SIZING, sinks: torch.Tensor | None = None,
                    window: int = 0, k_scale: float = 1.0, v_scale: float = 1.0,
                    v_words: bool = False) -> torch.Tensor:
    """q1: [T, Hq, D1], q2: [T, Hq, D2] | None, k1: [S, Hk, D1], k2: [S, Hk, D2] | None,
    v: [S, Hk, DV] | None (None: values are k1) -> [T, Hq, DV]. query_start None: decode.
    sinks [Hq] (softmax denominator logits) and window (> 0: sliding window): GPT-OSS.
    The cache tensors may be FP8, read as k * k_scale (k1 and k2) and v * v_scale.

    Tuning: num_splits / split_tiles (fewest KV tiles per split) for this call, else from
    `sizing`; tiles, else `attention_tiles`. v_words: an e4m3 V is read as 32-bit words
    (paged_tiles.load_e4m3_words)."""
    t, hq, d1 = q1.shape
    hk = k1.shape[1]
    check(hq % hk == 0, f"query heads {hq} not a multiple of kv heads {hk}")
    check(page_table.dim() == 2 and seq_lens.shape[0] == page_table.shape[0],
          "page_table must be [B, P] with seq_lens [B]")
    group, decode, shared_v = hq // hk, query_start is None, v is None
    vv = k1 if shared_v else v
    dv = vv.shape[-1]
    d2 = q2.shape[-1] if q2 is not None else 0
    if v_words:
        check_e4m3_words(k1)
        check_e4m3_words(vv)
    tiles = (attention_tiles(decode, shared_v, group, t, fp8=k1.element_size() == 1)
             if tiles is None else tiles)
    n_hblk = triton.cdiv(group, tiles.g_blk)
    max_len = page_table.shape[1] * page_size
    if decode:
        check(t == seq_lens.shape[0], "decode: q must have one row per sequence")
        nb, bb, bt, qs = t, seq_lens, seq_lens, seq_lens
    else:
        bb, bt, nb = block_map(query_start, t, tiles.block_t)
        qs = query_start
    programs = nb * hk * n_hblk
    # a GQA extend launch's blocks of tokens: nb counts a spare block per row besides, which
    # an extend graph's empty rows never use
    busy = programs if decode or shared_v else triton.cdiv(t, tiles.block_t) * hk * n_hblk
    if window > 0:  # a program reads at most its rows' windows
        max_len = min(max_len, window + (0 if decode else tiles.block_t))
    if num_splits is None and decode:
        num_splits = sizing.decode_splits(programs, max_len, tiles.block_n, q1.device, shared_v)
    elif num_splits is None:
        num_splits = sizing.extend_splits(busy, max_len, tiles.block_n, q1.device,
                                          tiles.split_wave, tiles.split_tiles)
    if split_tiles is None:
        split_tiles = tiles.split_tiles or sizing.tiles_per_split(programs, shared_v)
    check(split_tiles >= 1, "split_tiles must be >= 1")
    out = torch.empty(t, hq, dv, dtype=q1.dtype, device=q1.device)          # [T, Hq, DV]
    part_o, part_l = split_buffers(out.shape, num_splits, out)
    q2_, k2_ = (q2, k2) if q2 is not None else (q1, k1)
    grid = (nb, hk * n_hblk, num_splits)
    _paged_attn_kernel[grid](
        q1, q2_, k1, k2_, vv, out, part_o, part_l, q1 if sinks is None else sinks,
        page_table, qs, seq_lens, bb, bt,
        scale * k_scale * math.log2(math.e), v_scale, group,
        split_tiles * tiles.block_n, num_splits,
        q1.stride(0), q1.stride(1), q2_.stride(0), q2_.stride(1),
        k1.stride(0), k1.stride(1), k2_.stride(0), k2_.stride(1), vv.stride(0), vv.stride(1),
        out.stride(0), out.stride(1), page_table.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2) if num_splits > 1 else 0,
        part_l.stride(0), part_l.stride(1),
        D1=d1, D2=d2, DV=dv, BLOCK_D1=max(16, next_pow2(d1)), BLOCK_D2=max(16, next_pow2(d2)),
        BLOCK_DV=max(16, next_pow2(dv)), G_BLK=tiles.g_blk, BLOCK_T=tiles.block_t,
        BLOCK_N=tiles.block_n, N_HBLK=n_hblk, HAS_D2=q2 is not None,
        SHARED_V=shared_v, DECODE=decode,
        EVEN_D=all(pow2_dim(x) for x in (d1, dv) + ((d2,) if d2 else ())),
        WINDOW=window, HAS_SINKS=sinks is not None, PAGE_SIZE=page_size, V_WORDS=v_words,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl_launch(q1.device))
    if num_splits > 1:
        merge_splits(part_o, part_l, out, sinks)
    return out
