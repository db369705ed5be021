"""Where batch-1 MLA decode time goes: per-program timelines of two experimental kernels.

    PYTHONPATH=. python3 scripts/mla_decode_timeline.py [--ctx 131072]   (a CUDA GPU with TMA)

DeepSeek-V2-Lite shapes (16 heads, latent 512, rope 64, page size 64), one row of ctx keys.
Prints the ceilings, the registered op's time (kernels/triton/mla_decode.py) and, for each
variant, the op's time with and without the split merge and one timeline: every program
stamps %globaltimer at its start, after its first KV tile, at its loop's end and after storing
its partial, with its %smid. The variants, both TMA-only copies of the registered kernel's math
(32-key tiles, 3 stages):
- `static`: 2 programs per SM, each a contiguous run of tiles, the next tile's page index read
  one tile ahead (the registered kernel reads it in the same iteration);
- `ticket`: persistent programs that take tiles from a shared counter two tickets ahead, so
  that fast programs take more (the counter resets itself: the last program out zeroes it).
docs/KERNELS_HISTORY.md (seventh session) has the figures and what they say.
"""
from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernel_bench.harness import graph_ms, measure_ceilings, rel_err
from kernel_bench.inputs import mla_cache_bytes, mla_inputs
from kernels.triton.common import num_sms
from kernels.triton.mla_decode import mla_decode_chunked
from kernels.triton.split_kv import merge_splits, split_range

DEV = "cuda"
STAMPS = 8   # int64 slots per program: start, first tile, loop end, stored, SM, tiles


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _sm_id():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _query(QL, QR, b, L: tl.constexpr, R: tl.constexpr, CH: tl.constexpr, G_BLK: tl.constexpr):
    """The row's query: four latent chunks [G_BLK, CH] and the rope part [G_BLK, R]."""
    head = tl.arange(0, G_BLK)
    ch = tl.arange(0, CH)
    q_row = QL + b * G_BLK * L + head[:, None] * L
    q0 = tl.load(q_row + ch[None, :])
    q1 = tl.load(q_row + CH + ch[None, :])
    q2 = tl.load(q_row + 2 * CH + ch[None, :])
    q3 = tl.load(q_row + 3 * CH + ch[None, :])
    qr = tl.load(QR + b * G_BLK * R + head[:, None] * R + tl.arange(0, R)[None, :])
    return q0, q1, q2, q3, qr


@triton.jit
def _tile(acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, qr, DescLat, DescRope, row0, valid,
          scale_log2, CH: tl.constexpr, L: tl.constexpr):
    """One online-softmax step over the BLOCK_N cache rows from row0 (copied by TMA); a tile
    that is not valid adds nothing."""
    k0 = DescLat.load([row0, 0])
    k1 = DescLat.load([row0, CH])
    k2 = DescLat.load([row0, 2 * CH])
    k3 = DescLat.load([row0, 3 * CH])
    kr = DescRope.load([row0, L])
    qk = tl.dot(q0, tl.trans(k0))
    qk += tl.dot(q1, tl.trans(k1))
    qk += tl.dot(q2, tl.trans(k2))
    qk += tl.dot(q3, tl.trans(k3))
    qk += tl.dot(qr, tl.trans(kr))
    qk = tl.where(valid, qk * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(k0.dtype)
    acc0 = acc0 * alpha[:, None] + tl.dot(p, k0)
    acc1 = acc1 * alpha[:, None] + tl.dot(p, k1)
    acc2 = acc2 * alpha[:, None] + tl.dot(p, k2)
    acc3 = acc3 * alpha[:, None] + tl.dot(p, k3)
    return acc0, acc1, acc2, acc3, m_new, l_i


@triton.jit
def _store_partial(acc0, acc1, acc2, acc3, m_i, l_i, PartO, PartL, b, prog, num_progs,
                   L: tl.constexpr, CH: tl.constexpr, G_BLK: tl.constexpr):
    """The program's partial output and lse, in merge_splits' [B, H, programs, L] layout."""
    head = tl.arange(0, G_BLK)
    ch = tl.arange(0, CH)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    p_row = PartO + ((b * G_BLK + head[:, None]) * num_progs + prog) * L
    tl.store(p_row + ch[None, :], acc0 / l_safe[:, None])
    tl.store(p_row + CH + ch[None, :], acc1 / l_safe[:, None])
    tl.store(p_row + 2 * CH + ch[None, :], acc2 / l_safe[:, None])
    tl.store(p_row + 3 * CH + ch[None, :], acc3 / l_safe[:, None])
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(PartL + (b * G_BLK + head) * num_progs + prog, lse)


@triton.jit
def _stamp(Stamps, pid, t0, t1, t2, tiles):
    base = Stamps + pid * 8
    tl.store(base + 0, t0)
    tl.store(base + 1, t1)
    tl.store(base + 2, t2)
    tl.store(base + 3, _now())
    tl.store(base + 4, _sm_id().to(tl.int64))
    tl.store(base + 5, tiles.to(tl.int64))


@triton.jit
def _row_of(pt, n, page_size):
    """The cache row of key n of the row whose page table is pt."""
    return tl.load(pt + n // page_size) * page_size + n % page_size


@triton.jit
def _static_kernel(QL, QR, DescLat, DescRope, PartO, PartL, PageTable, SeqLens, Stamps,
                   scale_log2, page_size, num_progs, stride_pt, L: tl.constexpr,
                   R: tl.constexpr, CH: tl.constexpr, G_BLK: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """grid (B, programs): a contiguous run of whole tiles each (the row's length must be a
    multiple of BLOCK_N), the next tile's cache row read one tile ahead."""
    b, prog = tl.program_id(0), tl.program_id(1)
    t0 = _now()
    q0, q1, q2, q3, qr = _query(QL, QR, b, L, R, CH, G_BLK)
    lo, hi = split_range(prog, tl.load(SeqLens + b), BLOCK_N, num_progs, BLOCK_N)
    hi = tl.maximum(hi, lo)
    pt = PageTable + b * stride_pt
    acc0 = tl.zeros([G_BLK, CH], dtype=tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    m_i = tl.full([G_BLK], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([G_BLK], dtype=tl.float32)
    row_next = tl.load(pt + lo // page_size, mask=lo < hi, other=0) * page_size + lo % page_size
    t1 = t0
    for n0 in tl.range(lo, hi, BLOCK_N):
        row0 = row_next
        n1 = n0 + BLOCK_N
        row_next = (tl.load(pt + n1 // page_size, mask=n1 < hi, other=0) * page_size
                    + n1 % page_size)
        acc0, acc1, acc2, acc3, m_i, l_i = _tile(acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2,
                                                 q3, qr, DescLat, DescRope, row0, True,
                                                 scale_log2, CH, L)
        t1 = tl.where(n0 == lo, _now(), t1)
    t2 = _now()
    _store_partial(acc0, acc1, acc2, acc3, m_i, l_i, PartO, PartL, b, prog, num_progs, L, CH,
                   G_BLK)
    _stamp(Stamps, b * num_progs + prog, t0, t1, t2, (hi - lo) // BLOCK_N)


@triton.jit
def _ticket_kernel(QL, QR, DescLat, DescRope, PartO, PartL, PageTable, SeqLens, Counter,
                   Stamps, scale_log2, page_size, num_progs, oob_row, stride_pt,
                   L: tl.constexpr, R: tl.constexpr, CH: tl.constexpr, G_BLK: tl.constexpr,
                   BLOCK_N: tl.constexpr, SEM: tl.constexpr):
    """grid (B, programs): each program runs ceil(tiles / programs) iterations, each on the
    tile of a ticket taken two iterations earlier (a ticket past the row is an empty tile, its
    copy out of bounds); the two tickets still ahead at the end are processed after the loop.
    Counter [B, 2]: tickets taken, programs done."""
    b, prog = tl.program_id(0), tl.program_id(1)
    t0 = _now()
    q0, q1, q2, q3, qr = _query(QL, QR, b, L, R, CH, G_BLK)
    n_tiles = tl.cdiv(tl.load(SeqLens + b), BLOCK_N)
    pt = PageTable + b * stride_pt
    ctr = Counter + b * 2
    acc0 = tl.zeros([G_BLK, CH], dtype=tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    m_i = tl.full([G_BLK], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([G_BLK], dtype=tl.float32)
    tk = tl.atomic_add(ctr, 1, sem=SEM)
    ok_next = tk < n_tiles
    row_next = tl.where(ok_next, _row_of(pt, tl.minimum(tk, n_tiles - 1) * BLOCK_N, page_size),
                        oob_row)
    tk_next = tl.atomic_add(ctr, 1, sem=SEM)
    done = 0
    t1 = t0
    for i in tl.range(0, tl.cdiv(n_tiles, num_progs)):
        row0, ok = row_next, ok_next
        done += ok.to(tl.int32)
        ok_next = tk_next < n_tiles
        row_next = tl.where(ok_next, _row_of(pt, tl.minimum(tk_next, n_tiles - 1) * BLOCK_N,
                                             page_size), oob_row)
        tk_next = tl.atomic_add(ctr, 1, sem=SEM)
        acc0, acc1, acc2, acc3, m_i, l_i = _tile(acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2,
                                                 q3, qr, DescLat, DescRope, row0, ok,
                                                 scale_log2, CH, L)
        t1 = tl.where(i == 0, _now(), t1)
    if ok_next:   # the tickets taken ahead: a fast program's extra tiles
        acc0, acc1, acc2, acc3, m_i, l_i = _tile(acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2,
                                                 q3, qr, DescLat, DescRope, row_next, True,
                                                 scale_log2, CH, L)
        done += 1
    if tk_next < n_tiles:
        acc0, acc1, acc2, acc3, m_i, l_i = _tile(acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2,
                                                 q3, qr, DescLat, DescRope,
                                                 _row_of(pt, tk_next * BLOCK_N, page_size),
                                                 True, scale_log2, CH, L)
        done += 1
    t2 = _now()
    _store_partial(acc0, acc1, acc2, acc3, m_i, l_i, PartO, PartL, b, prog, num_progs, L, CH,
                   G_BLK)
    if tl.atomic_add(ctr + 1, 1) == num_progs - 1:   # the last program out resets the row
        tl.atomic_xchg(ctr, 0)
        tl.atomic_xchg(ctr + 1, 0)
    _stamp(Stamps, b * num_progs + prog, t0, t1, t2, done)


_COUNTER: dict[str, torch.Tensor] = {}


def run_variant(kind: str, ql, qr, cache, table, sl, page_size: int, scale: float, programs: int,
                stamps: torch.Tensor | None = None, merge: bool = True, block_n: int = 32,
                warps: int = 4, stages: int = 3, sem: str = "relaxed") -> torch.Tensor:
    """One call of a variant ('static' or 'ticket') -> [B, H, L]; stamps [B * programs, 8]."""
    bsz, heads, lat = ql.shape
    rope = qr.shape[-1]
    part_o = torch.empty(bsz, heads, programs, lat, dtype=torch.float32, device=DEV)
    part_l = torch.empty(bsz, heads, programs, dtype=torch.float32, device=DEV)
    stamps = (torch.empty(bsz * programs, STAMPS, dtype=torch.int64, device=DEV)
              if stamps is None else stamps)
    descs = (TensorDescriptor.from_tensor(cache, [block_n, lat // 4]),
             TensorDescriptor.from_tensor(cache, [block_n, rope]))
    common = dict(L=lat, R=rope, CH=lat // 4, G_BLK=heads, BLOCK_N=block_n, num_warps=warps,
                  num_stages=stages)
    scale_log2 = scale * math.log2(math.e)
    if kind == "static":
        _static_kernel[(bsz, programs)](ql, qr, *descs, part_o, part_l, table, sl, stamps,
                                        scale_log2, page_size, programs, table.stride(0),
                                        **common)
    else:
        if "c" not in _COUNTER:
            _COUNTER["c"] = torch.zeros(2 * 64, dtype=torch.int32, device=DEV)
        _ticket_kernel[(bsz, programs)](ql, qr, *descs, part_o, part_l, table, sl,
                                        _COUNTER["c"], stamps, scale_log2, page_size, programs,
                                        cache.shape[0], table.stride(0), SEM=sem, **common)
    out = torch.empty_like(ql)
    if merge:
        merge_splits(part_o, part_l, out)
    return out


def print_timeline(label: str, stamps: torch.Tensor) -> None:
    t = stamps.cpu().double()
    start, first, loop_end, stored, sm, tiles = (t[:, i] for i in range(6))
    zero = start.min()

    def q(x: torch.Tensor, p: float) -> float:
        return float(torch.quantile(x, p)) / 1e3

    per_tile = (loop_end - first) / (tiles - 1).clamp_min(1)
    print(f"  timeline {label}: span {q(stored - zero, 1):.1f}us; first tile p50 "
          f"{q(first - start, .5):.2f}us; each later tile p50 {q(per_tile, .5):.2f}us; store "
          f"p50 {q(stored - loop_end, .5):.2f}us; programs end p10/p50/last "
          f"{q(stored - zero, .1):.1f}/{q(stored - zero, .5):.1f}/{q(stored - zero, 1):.1f}us; "
          f"tiles per program {int(tiles.min())}-{int(tiles.max())}; programs per SM "
          f"{int(torch.bincount(sm.long()).max())}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=131072, help="keys (a multiple of 64)")
    ctx = ap.parse_args().ctx
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), f"torch {torch.__version__} triton {triton.__version__}")
    ceil = measure_ceilings()
    print(ceil.line())
    page_size, scale, sms = 64, (128 + 64) ** -0.5, num_sms(torch.device(DEV))
    table, cache, ql, qr, sl = mla_inputs(1, ctx, page_size, 16)
    args = (ql, qr, cache, table, sl, page_size, scale)
    nbytes, copy = mla_cache_bytes(1, ctx), ceil.copy_gbs

    def report(label: str, ms: float) -> None:
        print(f"{label:48s} {ms * 1e3:7.1f}us {nbytes / ms / 1e6 / copy:6.1%} of copy", flush=True)

    ref = mla_decode_chunked(*args)
    report(f"registered op, B=1 x {ctx}", graph_ms(lambda: mla_decode_chunked(*args)))
    for kind, sem in (("static", "relaxed"), ("ticket", "relaxed"), ("ticket", "acq_rel")):
        programs = 2 * sms
        err = rel_err(run_variant(kind, *args, programs, sem=sem), ref)
        label = f"{kind}{' ' + sem if kind == 'ticket' else ''}, {programs} programs"
        report(f"{label} (err {err:.1e})",
               graph_ms(lambda: run_variant(kind, *args, programs, sem=sem)))
        report(f"{label}, no merge",
               graph_ms(lambda: run_variant(kind, *args, programs, merge=False, sem=sem)))
        stamps = torch.zeros(programs, STAMPS, dtype=torch.int64, device=DEV)
        flush = torch.empty(256 << 20, dtype=torch.int8, device=DEV)
        for _ in range(3):   # the last call's stamps, L2 flushed before it
            flush.zero_()
            run_variant(kind, *args, programs, stamps=stamps, sem=sem)
        torch.cuda.synchronize()
        print_timeline(label, stamps)


if __name__ == "__main__":
    main()
