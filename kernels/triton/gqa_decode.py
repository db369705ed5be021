"""GQA decode attention whose split-KV merge runs in the last split's program, not a launch
of its own.

A decode launch with few rows splits each row's keys (split_kv.py) and the generic kernel
(attention.py) writes partials that a second launch merges. Here each split program writes its
partial output and log2-sum-exp in the same layout, then takes a ticket from a counter of its
(row, head block); the program that takes the row's last ticket merges the partials (reading
them past L1: other programs wrote them) and writes the output, then zeroes the counter for
the next launch. Counters live across launches and CUDA-graph replays; a launch touches them
only after its PDL wait, when every launch before it has finished, so no two share them.
Splits past a row's end do nothing (split 0 always runs: a row without keys gets zeros).

At one row the merge launch stays (`LAST_MERGE_MIN_ROWS`): Llama-3.1-8B's decode graph, 1K
keys, H200, PDL on (`scripts/gpu_op_ablation.py --ablations generic_decode gqa_merge_launch`),
us a step generic -> this kernel: B=2 4,800 -> 4,781, B=4 4,910 -> 4,840, B=16 5,357 ->
5,279 (an earlier run: B=8 5,096 -> 5,116, B=32 5,992 -> 5,885); at B=1 merging in the last
program took 4,264 against 4,242 with the merge launch. Tried and not kept: reading each
program's first tile of keys and values before the PDL wait (only the launch just before may
still run, and it writes only the query and the newest key): into registers it took 208
registers a thread and was slower at every batch size; asked into L2 (`prefetch.global.L2`)
it was within +-1% and more often slower.

Sinks (GPT-OSS) join the merge's denominator; sliding windows take the generic kernel.

With the step's new tokens (`NewTokens`: `rope_decode_attention`, a decode-only step) the
launch also does rope_store_kv's work, saving its launch a layer: each program rotates its
query heads (rope_kv.py's arithmetic), and the programs of a row's last split, the only ones
whose keys include the new one, write the new key (rotated) and value at the row's slot. At
1-2 rows (NEW_KEY_IN_REGISTERS_ROWS) they then attend to that key and value from registers,
rounded as the cache holds them; with more rows they read it back after a barrier.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton.attention import AttentionTiles, attention_tiles
from kernels.triton.common import check, next_pow2, per_batch, pow2_dim
from kernels.triton.paged_tiles import LOG2E, add_sink, attn_range, check_e4m3_words
from kernels.triton.pdl import pdl_begin, pdl_launch
from kernels.triton.rope_kv import (cache_value, load_heads, rope_rows, rotate_heads,
                                    store_cache_heads)
from kernels.triton.split_kv import (DEFAULT_SIZING, SPLIT_INTS, SplitSizing, merge_splits,
                                     split_buffers, split_length, split_range)

MERGE_TILE_ELEMS = 2048    # fp32 partials the last program loads at once: 128 registers a thread
LAST_MERGE_MIN_ROWS = 2    # launches of fewer rows merge in a launch of their own (module doc)
# With the new tokens (rope_decode_attention), launches of up to this many rows have the
# row's last split attend to its new key and value from registers, not read back from the
# cache after a barrier. Their 32-key tiles take 96 registers a thread either way on sm_90;
# at 64-key tiles (more rows) the registers take 140 against the barrier's 112, over the 128
# that keep 4 programs an SM
NEW_KEY_IN_REGISTERS_ROWS = 2
# GRID_ORDER: the grid is (KV heads x head blocks, rows, splits), so consecutive program ids
# are one row's heads. A cache slot holds every KV head of a token side by side and a program
# reads only its head's bytes of it (128 of 1,024 for the 8B over an FP8 cache), so a slot's
# bytes are read by programs that run together. H100 (copy 3,040 GB/s; the 8B's heads,
# graph replays, L2 flushed; `scripts/fp8kv_attention.py --gqa-sweep`), us a launch, rows
# first -> heads first: FP8 B=256 x 2K 430.9 -> 423.6, x 1K 227.9 -> 223.2; bf16 699.7 ->
# 692.0, 361.4 -> 354.7; at 32-128 rows within +-0.6%


@triton.jit
def _merge_in_last(PartO, PartL, Out, Sinks, tok, head0, group, hb, n_used, stride_pot,
                   stride_poh, stride_pos, stride_plt, stride_plh, stride_ot, stride_oh,
                   DV: tl.constexpr, BLOCK_DV: tl.constexpr, MERGE_G: tl.constexpr,
                   G_BLK: tl.constexpr, CHUNK_S: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Out[tok, heads] = the partials of splits [0, n_used) combined, for the MERGE_G-head
    slices of this head block (online over CHUNK_S splits at a time). Loads bypass L1 (.cg):
    other programs wrote the partials."""
    for g0 in range(0, tl.minimum(G_BLK, group - hb * G_BLK), MERGE_G):  # real heads only
        hg = hb * G_BLK + g0 + tl.arange(0, MERGE_G)                            # [G]
        h_ok = (g0 + tl.arange(0, MERGE_G) < G_BLK) & (hg < group)
        head = head0 + hg
        s = tl.arange(0, CHUNK_S)
        dv = tl.arange(0, BLOCK_DV)
        m = tl.full([MERGE_G], float("-inf"), dtype=tl.float32)
        den = tl.zeros([MERGE_G], dtype=tl.float32)
        acc = tl.zeros([MERGE_G, BLOCK_DV], dtype=tl.float32)
        for s0 in range(0, n_used, CHUNK_S):
            ok = h_ok[:, None] & (s0 + s < n_used)[None, :]                      # [G, S]
            lse = tl.load(PartL + tok * stride_plt + head[:, None] * stride_plh + s0
                          + s[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg")
            part = tl.load(PartO + tok * stride_pot + head[:, None, None] * stride_poh
                           + (s0 + s)[None, :, None] * stride_pos + dv[None, None, :],
                           mask=ok[:, :, None] & (dv[None, None, :] < DV), other=0.0,
                           cache_modifier=".cg")                                 # [G, S, DV]
            m_new = tl.maximum(m, tl.max(lse, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe[:, None])                                   # [G, S]
            den = den * alpha + tl.sum(w, 1)
            acc = acc * alpha[:, None] + tl.sum(part * w[:, :, None], 1)
            m = m_new
        if HAS_SINKS:
            sink = tl.load(Sinks + head, mask=h_ok, other=0.0).to(tl.float32) * LOG2E
            m_f = tl.maximum(m, sink)
            alpha = tl.exp2(m - m_f)
            den = den * alpha + tl.exp2(sink - m_f)
            acc = acc * alpha[:, None]
        out = acc / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(Out + tok * stride_ot + head[:, None] * stride_oh + dv[None, :],
                 out.to(Out.dtype.element_ty), mask=h_ok[:, None] & (dv[None, :] < DV))


@triton.jit
def _rope_and_store_new(Q, KNew, VNew, Pos, CosSin, KCache, VCache, Slots, tok, kvh, head0,
                        n_heads, store, stride_qt, stride_qh, stride_knt, stride_knh,
                        stride_vnt, stride_vnh, stride_cs, stride_ks, stride_kh, stride_vs,
                        stride_vh, inv_k_scale, inv_v_scale, R, D: tl.constexpr,
                        DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        G_BLK: tl.constexpr, IS_NEOX: tl.constexpr, FP8: tl.constexpr,
                        NEW_IN_REGS: tl.constexpr):
    """ROPE: (query heads [head0, head0 + n_heads) of token tok rotated, [G_BLK, BLOCK_D] in
    Q's dtype as rope_kv.py stores them; the new key and value of KV head kvh as the cache
    holds them, fp32 [BLOCK_D] / [BLOCK_DV], zeros unless `store` and NEW_IN_REGS). With
    `store` (the row's last split) the new key (rotated) and value are written at the token's
    slot (none below 0); without NEW_IN_REGS a barrier follows, so that this program's reads
    of the cache see them, with it the caller attends to them from registers instead."""
    d, cos, sin, partner, first, rot = rope_rows(tok, Pos, CosSin, stride_cs, R, BLOCK_D,
                                                 IS_NEOX)
    k_c = tl.zeros([BLOCK_D], dtype=tl.float32)
    v_c = tl.zeros([BLOCK_DV], dtype=tl.float32)
    if store:
        k, kok = rotate_heads(KNew + kvh * stride_knh, tok, stride_knt, stride_knh, 1, d, cos,
                              sin, partner, first, rot, D, 2)                    # [2, D]
        v, vok = load_heads(VNew + kvh * stride_vnh, tok, stride_vnt, stride_vnh, 1, DV, 2,
                            BLOCK_DV)
        slot = tl.load(Slots + tok).to(tl.int64)
        if slot >= 0:
            store_cache_heads(KCache + kvh * stride_kh, slot, stride_ks, stride_kh, k, kok,
                              inv_k_scale, FP8, 2, BLOCK_D)
            store_cache_heads(VCache + kvh * stride_vh, slot, stride_vs, stride_vh, v, vok,
                              inv_v_scale, FP8, 2, BLOCK_DV)
        if NEW_IN_REGS:   # row 1 is masked out (zeros): the sum is row 0
            k_c = tl.sum(tl.where(kok, cache_value(k, inv_k_scale, KCache, FP8).to(tl.float32),
                                  0.0), 0)
            v_c = tl.sum(tl.where(vok, cache_value(v, inv_v_scale, VCache, FP8).to(tl.float32),
                                  0.0), 0)
        else:
            tl.debug_barrier()   # the stores are visible to this program's threads after it
    q, _ = rotate_heads(Q + head0 * stride_qh, tok, stride_qt, stride_qh, n_heads, d, cos, sin,
                        partner, first, rot, D, G_BLK)
    return q.to(Q.dtype.element_ty), k_c, v_c


@triton.jit
def _attend_new_key(acc, m_i, l_i, q, k, v, scale_log2):
    """The online softmax (log2 units) of one more key k [D] and value v [DV] (fp32, as the
    cache holds them) for the query rows q [M, D]."""
    s = tl.sum(q.to(tl.float32) * k[None, :], 1) * scale_log2                    # [M]
    m_new = tl.maximum(m_i, s)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new)
    return acc * alpha[:, None] + p[:, None] * v[None, :], m_new, l_i * alpha + p


@triton.jit(**per_batch(ints=SPLIT_INTS + ("stride_pt", "last_merges"),
                        pointers=("PageTable", "SeqLens", "Pos", "Slots")))
def _gqa_decode_kernel(
        Q, K, V, Out, PartO, PartL, Tickets, Sinks, PageTable, SeqLens,
        KNew, VNew, Pos, CosSin, Slots,
        scale_log2, v_scale, group, min_split_len, num_splits, last_merges,
        stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
        stride_pt, stride_pot, stride_poh, stride_pos, stride_plt, stride_plh,
        stride_knt, stride_knh, stride_vnt, stride_vnh, stride_cs, inv_k_scale, inv_v_scale, R,
        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        G_BLK: tl.constexpr, BLOCK_N: tl.constexpr, N_HBLK: tl.constexpr,
        MERGE_G: tl.constexpr, CHUNK_S: tl.constexpr, EVEN_D: tl.constexpr,
        HAS_SINKS: tl.constexpr, PAGE_SIZE: tl.constexpr, ROPE: tl.constexpr,
        IS_NEOX: tl.constexpr, FP8_STORE: tl.constexpr, NEW_IN_REGS: tl.constexpr,
        PDL: tl.constexpr):
    """Program (KV head x head block, row b, split; GRID_ORDER): the paged kernel's decode
    path over the split's keys; then the output (one split), or the partial and, when
    last_merges, the ticket (module doc). last_merges is a run-time flag: one compiled
    variant serves both. ROPE: Q, KNew and VNew are the step's new tokens before rope and
    the cache write, which this launch does (`_rope_and_store_new`)."""
    pdl_begin(PDL)
    pid_h, b, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)   # GRID_ORDER
    kvh, hb = pid_h // N_HBLK, pid_h % N_HBLK
    tok = b.to(tl.int64)
    hg = hb * G_BLK + tl.arange(0, G_BLK)                                        # [M]
    row_ok = hg < group
    head = kvh * group + hg
    seq_len = tl.load(SeqLens + b)
    lo, hi = split_range(split, seq_len, min_split_len, num_splits, BLOCK_N)
    n_used = tl.maximum(tl.cdiv(seq_len, split_length(seq_len, min_split_len, num_splits,
                                                      BLOCK_N)), 1)     # splits with keys
    if split < n_used:
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        last = split == n_used - 1
        if ROPE:
            q, k_new, v_new = _rope_and_store_new(
                Q, KNew, VNew, Pos, CosSin, K, V, Slots, tok, kvh, kvh * group + hb * G_BLK,
                group - hb * G_BLK, last, stride_qt, stride_qh, stride_knt, stride_knh,
                stride_vnt, stride_vnh, stride_cs, stride_ks, stride_kh, stride_vs, stride_vh,
                inv_k_scale, inv_v_scale, R, D, DV, BLOCK_D, BLOCK_DV, G_BLK, IS_NEOX,
                FP8_STORE, NEW_IN_REGS)
        else:
            q = tl.load(Q + tok * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None] & (d[None, :] < D), other=0.0)       # [M, D]
        if K.dtype.element_ty == tl.float8e4nv and Q.dtype.element_ty == tl.bfloat16:
            q = q.to(tl.float16)      # as attention.py: e4m3 -> fp16 is one cvt a pair
        acc = tl.zeros([G_BLK, BLOCK_DV], dtype=tl.float32)
        m_i = tl.full([G_BLK], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([G_BLK], dtype=tl.float32)
        pos = tl.zeros([G_BLK], dtype=tl.int32) + seq_len - 1    # every key is visible
        pt = PageTable + tok * stride_pt
        new_in_regs = last & (seq_len > 0)       # (with ROPE and NEW_IN_REGS)
        if ROPE and NEW_IN_REGS:
            if new_in_regs:
                hi = hi - 1               # the new key: from registers, not from the cache
        full_end = lo + (hi - lo) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = attn_range(acc, m_i, l_i, q, q, K, K, V, pt, lo, full_end, hi, pos,
                                   kvh, PAGE_SIZE, stride_ks, stride_kh, stride_ks, stride_kh,
                                   stride_vs, stride_vh, scale_log2, D, D, DV, BLOCK_D, BLOCK_D,
                                   BLOCK_DV, BLOCK_N, False, False, EVEN_D, 0, True)
        if ROPE and NEW_IN_REGS:
            if new_in_regs:
                acc, m_i, l_i = _attend_new_key(acc, m_i, l_i, q, k_new, v_new, scale_log2)
        if HAS_SINKS:  # split: the merge adds the sink once
            if num_splits == 1:
                l_i = add_sink(l_i, m_i, Sinks, head, row_ok)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None] * v_scale                                    # [M, DV]
        omask = row_ok[:, None] & (dv[None, :] < DV)
        if num_splits == 1:
            tl.store(Out + tok * stride_ot + head[:, None] * stride_oh + dv[None, :],
                     out.to(Out.dtype.element_ty), mask=omask)
        else:
            tl.store(PartO + tok * stride_pot + head[:, None] * stride_poh + split * stride_pos
                     + dv[None, :], out, mask=omask)
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(PartL + tok * stride_plt + head * stride_plh + split, lse, mask=row_ok)
            if last_merges != 0:
                tl.debug_barrier()         # every thread's partial is out before the ticket
                ticket = Tickets + b * tl.num_programs(0) + pid_h
                if tl.atomic_add(ticket, 1) == n_used - 1:  # acq_rel: sees the others' partials
                    _merge_in_last(PartO, PartL, Out, Sinks, tok, kvh * group, group, hb,
                                   n_used, stride_pot, stride_poh, stride_pos, stride_plt,
                                   stride_plh, stride_ot, stride_oh, DV, BLOCK_DV, MERGE_G,
                                   G_BLK, CHUNK_S, HAS_SINKS)
                    tl.atomic_xchg(ticket, 0)
    elif last_merges == 0:  # (several splits) the merge launch reads every lse: -inf, no keys
        tl.store(PartL + tok * stride_plt + head * stride_plh + split,
                 tl.full([G_BLK], float("-inf"), dtype=tl.float32), mask=row_ok)


class _Tickets:
    """Per-device split tickets (int32 counters, zero between launches), at least MIN_TICKETS
    of them. A launch needing more gets a larger buffer; the old ones are kept, since captured
    CUDA graphs still point at them. A buffer is made outside graph capture only (the graphs
    are captured after an eager run of the same batch, cuda_graph.capture), as its zeros must
    be there before the first launch; start-up's compile threads share one under a lock."""

    MIN_TICKETS = 1 << 16           # 256 KB: B x KV heads of any split decode launch

    def __init__(self) -> None:
        self.current: dict[torch.device, torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def get(self, device: torch.device, n: int) -> torch.Tensor:
        with self.lock:
            have = self.current.get(device)
            if have is None or have.numel() < n:
                if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("gqa_decode: split tickets first needed inside CUDA-graph "
                                       "capture; run the batch eagerly first")
                if have is not None:
                    self.retired.append(have)
                have = torch.zeros(max(n, self.MIN_TICKETS), dtype=torch.int32, device=device)
                self.current[device] = have
            return have


TICKETS = _Tickets()


def merge_shape(group: int, g_blk: int, dv: int) -> tuple[int, int]:
    """(MERGE_G, CHUNK_S): the heads and splits one merge load covers, within
    MERGE_TILE_ELEMS fp32 elements."""
    merge_g = min(next_pow2(group), g_blk)
    return merge_g, max(1, MERGE_TILE_ELEMS // (merge_g * max(16, next_pow2(dv))))


@dataclass(frozen=True)
class NewTokens:
    """A decode step's new tokens before rope and the cache write (one a row): k [B, Hk, D],
    v [B, Hk, Dv], positions [B], cos_sin [max_pos, R] (cos | sin), slots [B] (below 0: not
    stored), as `rope_store_kv` takes them."""
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin: torch.Tensor
    rotary_dim: int
    is_neox: bool
    slots: torch.Tensor


def _new_token_args(new: NewTokens | None, q: torch.Tensor, k_scale: float, v_scale: float
                    ) -> tuple[tuple, tuple]:
    """(pointers, strides and scalars) of the kernel's new-token arguments; placeholders
    without them."""
    if new is None:
        return (q, q, q, q, q), (0, 0, 0, 0, 0, 1.0, 1.0, 0)
    k, v, cs = new.k, new.v, new.cos_sin
    check(q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1 and cs.stride(1) == 1,
          "gqa_decode: new tokens' last dims must be contiguous")
    check(new.rotary_dim % 2 == 0 and new.rotary_dim <= q.shape[2],
          f"gqa_decode: bad rotary_dim {new.rotary_dim}")
    check(k.shape[0] == v.shape[0] == new.positions.shape[0] == new.slots.shape[0] == q.shape[0],
          "gqa_decode: one new token a row")
    return ((k, v, new.positions, cs, new.slots),
            (k.stride(0), k.stride(1), v.stride(0), v.stride(1), cs.stride(0), 1.0 / k_scale,
             1.0 / v_scale, new.rotary_dim))


def gqa_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, scale: float,
               num_splits: int | None = None, tiles: AttentionTiles | None = None,
               sizing: SplitSizing = DEFAULT_SIZING, sinks: torch.Tensor | None = None,
               k_scale: float = 1.0, v_scale: float = 1.0,
               new: NewTokens | None = None) -> torch.Tensor:
    """q: [B, Hq, D], k_cache: [S, Hk, D], v_cache: [S, Hk, Dv] (16-bit or e4m3, read as
    k * k_scale, v * v_scale) -> [B, Hq, Dv]: one new token a row, over the row's seq_lens
    cached keys (its own included). sinks [Hq]: GPT-OSS's. Splits from `sizing` unless given.
    new: q is not yet rotated and the new tokens' K/V not yet in the cache: this launch does
    both (rope_store_kv's arithmetic)."""
    t, hq, d = q.shape
    hk, dv = k_cache.shape[1], v_cache.shape[-1]
    check(hq % hk == 0, f"query heads {hq} not a multiple of kv heads {hk}")
    check(page_table.dim() == 2 and seq_lens.shape[0] == page_table.shape[0] == t,
          "decode: page_table [B, P] and seq_lens [B] with one query row each")
    check_e4m3_words(k_cache)
    check_e4m3_words(v_cache)
    group = hq // hk
    tiles = tiles or attention_tiles(True, False, group, t, fp8=k_cache.element_size() == 1,
                                     v_words=True)
    n_hblk = triton.cdiv(group, tiles.g_blk)
    programs = t * hk * n_hblk
    if num_splits is None:
        num_splits = sizing.decode_splits(programs, page_table.shape[1] * page_size,
                                          tiles.block_n, q.device, False)
    out = torch.empty(t, hq, dv, dtype=q.dtype, device=q.device)
    part_o, part_l = split_buffers(out.shape, num_splits, out)
    last_merges = num_splits > 1 and t >= LAST_MERGE_MIN_ROWS
    tickets = TICKETS.get(q.device, programs if last_merges else 1)
    merge_g, chunk_s = merge_shape(group, tiles.g_blk, dv)
    new_ptrs, new_args = _new_token_args(new, q, k_scale, v_scale)
    _gqa_decode_kernel[(hk * n_hblk, t, num_splits)](
        q, k_cache, v_cache, out, part_o, part_l, tickets, q if sinks is None else sinks,
        page_table, seq_lens, *new_ptrs, scale * k_scale * math.log2(math.e), v_scale, group,
        sizing.tiles_per_split(programs, False) * tiles.block_n, num_splits, int(last_merges),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2) if num_splits > 1 else 0,
        part_l.stride(0), part_l.stride(1), *new_args,
        D=d, DV=dv, BLOCK_D=max(16, next_pow2(d)), BLOCK_DV=max(16, next_pow2(dv)),
        G_BLK=tiles.g_blk, BLOCK_N=tiles.block_n, N_HBLK=n_hblk, MERGE_G=merge_g,
        CHUNK_S=chunk_s, EVEN_D=pow2_dim(d) and pow2_dim(dv), HAS_SINKS=sinks is not None,
        PAGE_SIZE=page_size, ROPE=new is not None, IS_NEOX=new is not None and new.is_neox,
        FP8_STORE=k_cache.element_size() == 1, NEW_IN_REGS=t <= NEW_KEY_IN_REGISTERS_ROWS,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **pdl_launch(q.device))
    if num_splits > 1 and not last_merges:
        merge_splits(part_o, part_l, out, sinks)
    return out
