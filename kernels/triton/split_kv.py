"""Split-KV: cut each attention program's keys into pieces that run as programs of their own,
then merge the pieces.

A launch with few programs (batch-1 decode, a few new tokens over a long prefix) cannot fill
the GPU with one program per (row, head block). Each program's key range is then cut into
num_splits pieces; a piece writes an fp32 partial output and its log2-sum-exp, and
`merge_splits` combines them. Used by the generic paged kernel (attention.py) and the chunked
MLA decode (mla_decode.py).

The sizing reads host values only (program count, page-table width, SM count), never the
sequence lengths, so it needs no host sync and a CUDA graph captured once serves every batch.
Each row is still cut by its own length (`split_range`): CUDA graphs pad page tables to the
longest servable sequence, and cutting by the table's width would put a short row on its
first split alone. Why the defaults are what they are: docs/KERNELS.md, "Split-KV".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton.common import next_pow2, num_sms, per_batch
from kernels.triton.paged_tiles import LOG2E
from kernels.triton.pdl import pdl_begin, pdl_launch

# Arguments that scale with the split count: not specialized (common.per_batch)
SPLIT_INTS = ("num_splits", "stride_pot", "stride_poh", "stride_plt", "stride_plh")
MAX_DECODE_SPLITS = 256    # the merge's narrowest lse vector holds this many splits


@dataclass(frozen=True)
class SplitSizing:
    """How many split-KV pieces a launch takes, and how short a piece may be."""
    # decode fills one wave: this many resident programs per SM (floor). A GQA partial is small
    # (2 KB per 32 KB tile); an MLA one is 32 KB of fp32 per 73 KB tile, and MLA programs are
    # register-bound (~2 per SM)
    gqa_splits_per_sm: int = 4
    mla_splits_per_sm: int = 2
    # a split covers at least this many KV tiles (MLA decode with many programs, and extend)
    min_split_tiles: int = 4
    # MLA launches of up to this many programs split down to 1 tile, up to 4x as many to 2:
    # with few programs a short row is better spread thin
    fine_split_programs: int = 4
    # the split count of an MLA decode launch, and of a GQA one of at most fine_cap_gqa_programs
    # programs (one row of 8 KV heads), is capped by the pieces of its own fewest tiles
    # (`tiles_per_split`: 1 for GQA and few-program MLA), not of min_split_tiles: a short row
    # then spreads one tile a program whatever its page table's width. The daemon captures its
    # decode graphs over max_model_len-wide tables, where `want` binds either way (its batch-1
    # decode: Llama-3.1-8B 242.5 tok/s before and after, DeepSeek-V2-Lite 456.3 -> 458.6); a
    # table as wide as the rows (eager launches, graphs over a short max_model_len, scripts/
    # gpu_op_ablation.py's) was split 4 tiles a program: H200, B=1 graphs over 1K-key tables
    # (`--ablations coarse_cap`), us a step: Llama-3.1-8B 4,160 -> 4,075 (8 -> 33 splits),
    # DeepSeek-V2-Lite 2,349 -> 2,162 (9 -> 33); at B=4 DeepSeek-V2-Lite 6,004 -> 5,820,
    # Llama-3.1-8B 4,759 -> 4,777 (32 programs: left coarse)
    fine_cap: bool = True
    fine_cap_gqa_programs: int = 8
    # extend launches split up to this many programs per SM (floor), at most max_extend_splits
    extend_wave: float = 1.25
    max_extend_splits: int = 32

    def tiles_per_split(self, programs: int, mla: bool) -> int:
        """Fewest KV tiles per split: 1 for GQA, whose partials are cheap; for MLA 1 / 2 /
        min_split_tiles with few / some / many programs."""
        if not mla or programs <= self.fine_split_programs:
            return 1
        return 2 if programs <= 4 * self.fine_split_programs else self.min_split_tiles

    def decode_splits(self, programs: int, max_len: int, block_n: int, device: torch.device,
                      mla: bool) -> int:
        """Splits per (row, head block) of a decode launch of `programs` programs over a page
        table max_len keys wide."""
        per_sm = self.mla_splits_per_sm if mla else self.gqa_splits_per_sm
        want = per_sm * num_sms(device) // programs
        fine = self.fine_cap and (mla or programs <= self.fine_cap_gqa_programs)
        tiles = self.tiles_per_split(programs, mla) if fine else self.min_split_tiles
        return int(max(1, min(want, self.most_splits(max_len, block_n, tiles),
                              MAX_DECODE_SPLITS)))

    def extend_splits(self, programs: int, max_len: int, block_n: int, device: torch.device,
                      wave: float | None = None, tiles: int | None = None) -> int:
        """Splits per extend program; 1 from wave / 2 programs per SM up (wave: extend_wave
        unless given; tiles: the fewest a split covers, min_split_tiles unless given)."""
        wave = self.extend_wave if wave is None else wave
        return int(max(1, min(int(wave * num_sms(device)) // programs,
                              self.most_splits(max_len, block_n, tiles), self.max_extend_splits)))

    def most_splits(self, max_len: int, block_n: int, tiles: int | None = None) -> int:
        """Splits of at least `tiles` (min_split_tiles) tiles that a page table max_len keys
        wide holds."""
        return max(1, max_len // ((tiles or self.min_split_tiles) * block_n))


DEFAULT_SIZING = SplitSizing()


@triton.jit
def split_length(kv_len, min_split_len, num_splits, BLOCK_N: tl.constexpr):
    """Keys a split-KV piece of a kv_len-key row covers: the row cut into num_splits runs of
    whole tiles, each at least min_split_len keys (a multiple of BLOCK_N)."""
    return tl.maximum(tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N, min_split_len)


@triton.jit
def split_range(split, kv_len, min_split_len, num_splits, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of one split-KV piece (`split_length`); the splits past the row's end are
    empty. One split (num_splits == 1) is the whole row."""
    length = split_length(kv_len, min_split_len, num_splits, BLOCK_N)
    lo = split * length
    return lo, tl.minimum(lo + length, kv_len)


@triton.jit
def merge_partials(part, lse_row, num_splits, stride_pos, dv, dv_ok, sink,
                   BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, HAS_SINKS: tl.constexpr):
    """[BLOCK_DV] fp32: columns dv of one (row, head)'s split partials (`part`: its first
    split's row, `lse_row`: its log2-sum-exps) merged: sum_s exp2(lse_s - m) part_s /
    sum_s exp2(lse_s - m). Splits are read CHUNK_S at a time so that many loads are in flight
    at once, up to the last non-empty split (non-empty splits are a prefix; empty ones wrote
    no partial). HAS_SINKS: `sink` (a logit, natural log) joins the denominator."""
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_row + s, mask=s < num_splits, other=float("-inf"))   # [S]
    m = tl.max(lse, 0)
    if HAS_SINKS:
        sink = sink * LOG2E
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.exp2(lse - m), 0)
    if HAS_SINKS:
        den += tl.exp2(sink - m)
    used = tl.max(tl.where(lse > float("-inf"), s + 1, 0), 0)                # splits with keys
    acc = tl.zeros(dv.shape, dtype=tl.float32)
    c = tl.arange(0, CHUNK_S)
    for s0 in range(0, used, CHUNK_S):
        ok = s0 + c < used
        w = tl.exp2(tl.load(lse_row + s0 + c, mask=ok, other=float("-inf")) - m)    # [C]
        p = tl.load(part + (s0 + c)[:, None] * stride_pos + dv[None, :],
                    mask=ok[:, None] & dv_ok[None, :], other=0.0)                # [C, DV]
        acc += tl.sum(p * w[:, None], 0)
    return acc / tl.where(den > 0, den, 1.0)


@triton.jit(**per_batch(ints=SPLIT_INTS))
def _merge_splits_kernel(PartO, PartL, Out, Sinks, num_splits, stride_pot, stride_poh,
                         stride_pos, stride_plt, stride_plh, stride_ot, stride_oh,
                         DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
                         CHUNK_S: tl.constexpr, HAS_SINKS: tl.constexpr, PDL: tl.constexpr):
    """Out[t, h, cols] = `merge_partials` of (t, h). HAS_SINKS: head h's sink logit Sinks[h]
    (natural log) joins the denominator."""
    pdl_begin(PDL)
    t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    sink = 0.0
    if HAS_SINKS:
        sink = tl.load(Sinks + h).to(tl.float32)
    out = merge_partials(PartO + t * stride_pot + h * stride_poh,
                         PartL + t * stride_plt + h * stride_plh, num_splits, stride_pos, dv,
                         dv < DV, sink, BLOCK_S, CHUNK_S, HAS_SINKS)
    tl.store(Out + t * stride_ot + h * stride_oh + dv, out.to(Out.dtype.element_ty), mask=dv < DV)


MERGE_TILE_ELEMS = 4096    # fp32 partial-output elements one merge load brings in (16 KB)


def merge_tiles(rows: int, dv: int, num_splits: int, device: torch.device
                ) -> tuple[int, int, int]:
    """(BLOCK_DV, BLOCK_S, CHUNK_S) of the split merge. With few rows (batch-1 decode: one
    program per head and column block) the merge is latency-bound, its chunks serial loads: so
    column blocks narrow until there are ~2 programs per SM, and each load takes as many
    splits as fit MERGE_TILE_ELEMS. BLOCK_S (the lse vector) is at least MAX_DECODE_SPLITS
    wide, so eager batches of any split count share one compiled variant per BLOCK_DV."""
    block_dv = min(128, max(16, next_pow2(dv)))
    while block_dv > 16 and rows * triton.cdiv(dv, block_dv) < 2 * num_sms(device):
        block_dv //= 2
    block_s = max(MAX_DECODE_SPLITS, next_pow2(num_splits))
    return block_dv, block_s, min(block_s, max(2, MERGE_TILE_ELEMS // block_dv))


def merge_splits(part_o: torch.Tensor, part_l: torch.Tensor, out: torch.Tensor,
                 sinks: torch.Tensor | None = None) -> None:
    """part_o: [T, H, S, DV] fp32, part_l: [T, H, S] log2-sum-exp -> out [T, H, DV] (in place).
    sinks: [H] logits that join each head's denominator (GPT-OSS) or None."""
    t, h, num_splits, dv = part_o.shape
    block_dv, block_s, chunk_s = merge_tiles(t * h, dv, num_splits, part_o.device)
    _merge_splits_kernel[(t, h, triton.cdiv(dv, block_dv))](
        part_o, part_l, out, out if sinks is None else sinks, num_splits, part_o.stride(0),
        part_o.stride(1), part_o.stride(2), part_l.stride(0), part_l.stride(1), out.stride(0),
        out.stride(1), DV=dv, BLOCK_DV=block_dv, BLOCK_S=block_s, CHUNK_S=chunk_s,
        HAS_SINKS=sinks is not None, num_warps=4, **pdl_launch(out.device))


def split_buffers(shape: tuple[int, ...], num_splits: int, out: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(PartO [*shape[:-1], S, DV] fp32, PartL [*shape[:-1], S] fp32). With one split the
    kernels write `out` directly: the partials are then one-element fp32 placeholders of the
    same ranks, never written, so that a launch with one split and a launch with several are
    the same compiled variant (the kernels branch on num_splits at run time, not on a
    constexpr: one compile fewer per tile shape at start-up)."""
    lead, dv = shape[:-1], shape[-1]
    if num_splits <= 1:
        return _placeholders(out.device, len(lead))
    part_o = torch.empty(*lead, num_splits, dv, dtype=torch.float32, device=out.device)
    part_l = torch.empty(*lead, num_splits, dtype=torch.float32, device=out.device)
    return part_o, part_l


@functools.lru_cache(maxsize=None)
def _placeholders(device: torch.device, lead_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """split_buffers' one-split partials, made once per device (no allocation per launch)."""
    return (torch.empty((1,) * (lead_dims + 2), dtype=torch.float32, device=device),
            torch.empty((1,) * (lead_dims + 1), dtype=torch.float32, device=device))
