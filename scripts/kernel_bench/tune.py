"""Sweeps behind the kernels' default tuning: each times variants of one kernel family at its
target shapes (graph replay, L2 flushed) and prints one line per variant with its rate and the
same-run ceiling's percentage, so that the defaults can be set from measurements. Variants
are passed to the kernels as arguments (tiles, split sizing, knobs); nothing is patched.

Families (`python -m scripts.kernel_bench tune <family>`): attention (tiles and split counts
of the generic paged kernel), mla (MLA decode: generic kernel and kernels/triton/mla_decode.py),
stages (pipeline depths of the generic kernel), prefill (kernels/triton/prefill.py), moe
(fused MoE tiles), moe-decode (its tiles at batch 1), splits (split-KV: tiles per split and
split counts)."""
from __future__ import annotations

import itertools
from functools import partial
from typing import Callable

import torch

from kernels import reference as R
from kernels.triton import attention_ops as TA
from kernels.triton import moe as TM
from kernels.triton.attention import AttentionTiles, attention_tiles, paged_attention
from kernels.triton.mla_decode import mla_decode_chunked
from kernels.triton.moe import MoeTiles
from kernels.triton.prefill import PrefillTiles, prefill_attention
from kernels.triton.split_kv import DEFAULT_SIZING, SplitSizing

from .harness import BF16, DEV, TOL, Ceilings, graph_ms, rate, rel_err
from .inputs import (MLA_SCALE, causal_flops, gqa_extend_inputs, gqa_inputs, mla_cache_bytes,
                     mla_inputs, moe_weights, new_token_kv)

GQA_SCALE = 128 ** -0.5


def time_variant(ceil: Ceilings, tag: str, label: str, fn: Callable[[], torch.Tensor],
                 work: float, unit: str,
                 err_of: Callable[[torch.Tensor], float] | None = None,
                 note: Callable[[float], str] = lambda ms: "") -> float | None:
    """Check one variant's output when err_of is given (< TOL), time it as a graph and print
    one line: its rate, the ceiling's percentage and note(ms). Returns the rate, or None when
    the variant raised (printed) or failed the check."""
    try:
        err = err_of(fn()) if err_of is not None else None
        ms = graph_ms(fn)
    except Exception as e:  # noqa: BLE001 - a variant that does not run is reported, skipped
        print(f"  {tag} {label} ERROR {type(e).__name__}: {str(e)[:120]}", flush=True)
        torch.cuda.empty_cache()
        return None
    r = rate(work, ms, unit)
    bad = err is not None and not err < TOL
    check = "" if err is None else f" err={err:.1e}" + (" FAIL" if bad else "")
    print(f"  {tag} {label} {ms * 1e3:9.1f}us {r:8.1f} {unit} {100 * r / ceil.of(unit):5.1f}%"
          f"{check}{note(ms)}", flush=True)
    return None if bad else r


def max_err_against(base: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """err_of for time_variant: max |out - base| / max |base| (NaN -> inf: fails the check)."""
    base = base.float()
    denom = float(base.abs().max().clamp_min(1e-30))

    def max_err(out: torch.Tensor) -> float:
        err = float((out.float() - base).abs().max()) / denom
        return err if err == err else float("inf")
    return max_err


def _gqa_decode_bytes(batch: int, ctx: int) -> int:
    return 4 * batch * ctx * 8 * 128           # k and v, 8 kv heads x 128, bf16


# ----------------------------------------------------------------------------- attention

def attention(ceil: Ceilings, gqa_decode: bool = False, mla_only: bool = False) -> None:
    """Tile and split-count variants of the generic paged kernel: MLA decode (through
    mla_decode_generic) at 2 / 4 / 8 programs per SM, and GQA decode (with gqa_decode, also
    its split counts; mla_only: MLA decode alone)."""
    print("\n== tune attention: generic paged kernel", flush=True)

    def decode_gqa(batch: int, ctx: int, variants: tuple, splits_per_sm: tuple) -> None:
        table, kc, vc, q, sl = gqa_inputs(batch, ctx, 16)
        for spm in splits_per_sm:
            sizing = SplitSizing(gqa_splits_per_sm=spm)
            for n, w, st in variants:
                tiles = AttentionTiles(g_blk=16, block_t=1, block_n=n, num_warps=w, num_stages=st)
                fn = partial(paged_attention, q, None, kc, None, vc, table, None, sl, 16,
                             GQA_SCALE, tiles=tiles, sizing=sizing)
                time_variant(ceil, "tune", f"decode B={batch} ctx={ctx} spm={spm} N={n} w={w} "
                             f"s={st}", fn, _gqa_decode_bytes(batch, ctx), "GB/s")
        del table, kc, vc, q
        torch.cuda.empty_cache()

    if gqa_decode and not mla_only:
        for batch, ctx in ((1, 131072), (4, 32768)):
            decode_gqa(batch, ctx, ((64, 4, 2), (128, 4, 2), (64, 4, 3)), (2, 4, 8))
    for batch, ctx in ((1, 32768), (1, 131072), (64, 8192)):
        table, cache, ql, qr, sl = mla_inputs(batch, ctx, 16, 16)
        for spm in (2, 4, 8):
            sizing = SplitSizing(mla_splits_per_sm=spm)
            for n, w, st in ((32, 4, 2), (64, 4, 2), (128, 8, 2), (64, 8, 2), (64, 8, 3),
                             (128, 8, 3), (32, 4, 3)):
                tiles = AttentionTiles(g_blk=16, block_t=1, block_n=n, num_warps=w, num_stages=st)
                fn = partial(TA.mla_decode_generic, ql, qr, cache, table, sl, 16, MLA_SCALE,
                             tiles=tiles, sizing=sizing)
                time_variant(ceil, "tune", f"mla_decode B={batch} ctx={ctx} spm={spm} N={n} "
                             f"w={w} s={st}", fn, mla_cache_bytes(batch, ctx), "GB/s")
        del table, cache, ql, qr
        torch.cuda.empty_cache()
    if not mla_only:
        for batch, ctx in ((1, 131072), (16, 8192)):
            decode_gqa(batch, ctx, ((64, 4, 2), (128, 4, 2), (128, 8, 2), (64, 4, 3)), (4,))


def short_decode(ceil: Ceilings) -> None:
    """Batch-1 GQA decode of short rows (512 / 2K / 8K keys) in a 128K-wide page table, as the
    daemon's decode graphs launch it: the split count comes from the table's width (the rows'
    lengths are on the device), and each split takes at least `split_tiles` tiles of the row,
    so a short row fills the first few splits and leaves the others empty. Variants: split_tiles
    and tiles at the rule's count, and a few fixed counts."""
    print("\n== tune attention: batch-1 decode of short rows in a 128K-wide table", flush=True)
    for ctx in (512, 2048, 8192):
        table, kc, vc, q, sl = gqa_inputs(1, ctx, 16, table_ctx=131072)
        for splits, split_tiles in ((None, 1), (None, 2), (None, 4), (None, 8), (4, 1), (8, 1),
                                    (16, 1)):
            for n, w, st in ((64, 4, 2), (32, 4, 2), (128, 4, 2), (64, 4, 3), (32, 4, 3)):
                tiles = AttentionTiles(g_blk=16, block_t=1, block_n=n, num_warps=w, num_stages=st)
                fn = partial(paged_attention, q, None, kc, None, vc, table, None, sl, 16,
                             GQA_SCALE, num_splits=splits, split_tiles=split_tiles, tiles=tiles)
                time_variant(ceil, "tune", f"decode B=1 ctx={ctx} splits={splits or 'rule'} "
                             f"split_tiles={split_tiles} N={n} w={w} s={st}", fn,
                             _gqa_decode_bytes(1, ctx), "GB/s")
        del table, kc, vc, q
        torch.cuda.empty_cache()


def short_mla(ceil: Ceilings) -> None:
    """Batch-1 MLA decode (the chunked kernel, DeepSeek-V2-Lite: 16 heads, page size 64) of
    short rows (512 / 2K / 8K keys) in a 32K-wide page table (the preset's longest sequence),
    as the daemon's decode graphs launch it: the split count from the table's width, each
    split at least `split_tiles` tiles of the row. Variants: split counts (the rule's and
    fixed), split_tiles, key tiles and stages. err against the generic kernel."""
    print("\n== tune mla: batch-1 decode of short rows in a 32K-wide table", flush=True)
    page_size, heads = 64, 16
    for ctx in (512, 2048, 8192):
        table, cache, ql, qr, sl = mla_inputs(1, ctx, page_size, heads, table_ctx=32768)
        max_err = max_err_against(TA.mla_decode_generic(ql, qr, cache, table, sl, page_size,
                                                         MLA_SCALE))
        for splits in (None, 32, 64, 128):
            for split_tiles in (1, 2):
                for n, st in ((64, 2), (32, 2), (32, 3)):
                    fn = partial(mla_decode_chunked, ql, qr, cache, table, sl, page_size,
                                 MLA_SCALE, num_splits=splits, split_tiles=split_tiles,
                                 block_n=n, num_stages=st)
                    time_variant(ceil, "tune", f"mla_decode B=1 ctx={ctx} splits="
                                 f"{splits or 'rule'} split_tiles={split_tiles} N={n} s={st}",
                                 fn, mla_cache_bytes(1, ctx), "GB/s", max_err)
        del table, cache, ql, qr
        torch.cuda.empty_cache()


def stages(ceil: Ceilings) -> None:
    """Pipeline depth (num_stages) and tile variants of the generic paged kernel: GQA decode
    at batch 1, MLA decode, and the 8K prefill (target: 50% of the GEMM rate)."""
    print("\n== tune stages: generic paged attention kernel", flush=True)
    for batch, ctx in ((1, 32768), (1, 131072), (16, 8192)):
        table, kc, vc, q, sl = gqa_inputs(batch, ctx, 16)
        for n, w, st in ((64, 4, 2), (64, 4, 4), (64, 4, 5), (32, 4, 5), (128, 8, 5)):
            tiles = AttentionTiles(g_blk=16, block_t=1, block_n=n, num_warps=w, num_stages=st)
            fn = partial(paged_attention, q, None, kc, None, vc, table, None, sl, 16, GQA_SCALE,
                         tiles=tiles)
            time_variant(ceil, "tune stages", f"decode B={batch} ctx={ctx} N={n} w={w} s={st}",
                         fn, _gqa_decode_bytes(batch, ctx), "GB/s")
        del kc, vc
    for batch, ctx in ((1, 131072), (64, 8192)):
        table, cache, ql, qr, sl = mla_inputs(batch, ctx, 64, 16)
        for n, w, st in ((32, 4, 2), (32, 4, 5), (16, 4, 5), (32, 8, 5)):
            tiles = AttentionTiles(g_blk=16, block_t=1, block_n=n, num_warps=w, num_stages=st)
            fn = partial(TA.mla_decode_generic, ql, qr, cache, table, sl, 64, MLA_SCALE,
                         tiles=tiles)
            time_variant(ceil, "tune stages", f"mla_decode B={batch} ctx={ctx} N={n} w={w} "
                         f"s={st}", fn, mla_cache_bytes(batch, ctx), "GB/s")
        del cache
    seq = 8192
    table, kc, vc, q, qs, sl = gqa_extend_inputs(seq, seq, 16)
    for g, t, n, w, st in ((4, 64, 64, 8, 3), (4, 64, 64, 8, 4), (4, 64, 64, 8, 5),
                           (4, 32, 64, 4, 3), (4, 32, 64, 4, 5), (4, 32, 128, 8, 3),
                           (4, 32, 128, 8, 4), (4, 64, 32, 8, 5), (4, 32, 64, 8, 4),
                           (4, 16, 128, 4, 3)):
        tiles = AttentionTiles(g_blk=g, block_t=t, block_n=n, num_warps=w, num_stages=st)
        fn = partial(paged_attention, q, None, kc, None, vc, table, qs, sl, 16, GQA_SCALE,
                     tiles=tiles)
        time_variant(ceil, "tune stages", f"extend q=kv={seq} G={g} T={t} N={n} w={w} s={st}",
                     fn, causal_flops(seq, seq, 32, 128, 128), "TFLOP/s")


# ----------------------------------------------------------------------------- MLA decode

MLA_TUNE_SHAPES = ((1, 131072), (64, 8192), (64, 32768), (1, 32768), (256, 4096))  # first prunes


def mla(ceil: Ceilings, top: int = 6, generic: bool = True) -> None:
    """kernels/triton/mla_decode.py's register-lean MLA decode (DeepSeek-V2-Lite: 16 heads,
    latent 512, rope 64, page size 64, bf16), after the generic kernel's variants (`attention
    --mla-only`) unless generic is False. Phase 1 at B=1 ctx=131072: nc 4 x block_n {32, 64}
    x num_warps {4, 8} x num_stages {2, 3, 5} x tma {False, True}, query hoisted, 24 configs;
    then the `top` best at the other shapes, and at batch 1 the best two with 0.5 / 1 / 2 / 4
    splits per SM. Each config is first checked against the generic kernel
    (mla_decode_generic): err = max |out - generic| / max |generic|; configs that raise print
    the error and are skipped. GB/s counts the KV cache bytes read."""
    if generic:
        attention(ceil, mla_only=True)
    page_size, heads = 64, 16
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def run_shape(batch: int, ctx: int, configs: list[dict]) -> list[tuple[float, dict]]:
        table, cache, ql, qr, sl = mla_inputs(batch, ctx, page_size, heads)
        nbytes = mla_cache_bytes(batch, ctx)
        gen = partial(TA.mla_decode_generic, ql, qr, cache, table, sl, page_size, MLA_SCALE)
        max_err = max_err_against(gen())
        gen_rate = time_variant(ceil, "tune mla_chunked",
                                f"{f'B={batch} ctx={ctx} generic kernel':64s}", gen, nbytes,
                                "GB/s")
        gen_ms = nbytes / gen_rate / 1e6 if gen_rate else float("nan")
        results = []
        for c in configs:
            label = (f"B={batch} ctx={ctx} nc={c['nc']} N={c['block_n']} w={c['num_warps']} "
                     f"s={c['num_stages']} qloop={int(c['q_in_loop'])} tma={int(c['tma'])}"
                     + (f" regs={c['max_regs']}" if c.get("max_regs") else "")
                     + (f" splits={c['num_splits']}" if c.get("num_splits") else ""))
            fn = partial(mla_decode_chunked, ql, qr, cache, table, sl, page_size, MLA_SCALE, **c)
            gbs = time_variant(ceil, "tune mla_chunked", f"{label:64s}", fn, nbytes, "GB/s",
                               max_err, lambda ms: f" (generic x{gen_ms / ms:.2f})")
            if gbs is not None:
                results.append((gbs, c))
        del table, cache, ql, qr, sl, max_err
        torch.cuda.empty_cache()
        return sorted(results, key=lambda r: -r[0])

    def sweep_splits(batch: int, ctx: int, ranked: list[tuple[float, dict]]) -> None:
        """Batch 1: split-KV count in SM multiples; fewer, longer splits write and merge
        fewer fp32 partials (32 KB each) but fill fewer resident slots."""
        if batch == 1:
            run_shape(batch, ctx, [dict(c, num_splits=int(sms * f)) for _, c in ranked[:2]
                                   for f in (0.5, 1, 2, 4)])

    # num_stages >= 5 is what gives the KV tile two shared-memory buffers; the query per tile
    # and 16-key tiles lost every earlier sweep (docs/KERNELS.md, "MLA decode")
    grid = [dict(nc=4, block_n=n, num_warps=w, num_stages=st, q_in_loop=False, tma=t)
            for n in (32, 64) for w in (4, 8) for st in (2, 3, 5) for t in (False, True)]
    first, rest = MLA_TUNE_SHAPES[0], MLA_TUNE_SHAPES[1:]
    print(f"\n== tune mla_decode_chunked: {len(grid)} configs at B={first[0]} ctx={first[1]}, "
          f"then the top {top} at the other shapes, split counts at batch 1", flush=True)
    ranked = run_shape(*first, grid)
    best = [c for _, c in ranked[:top]]
    print(f"  tune mla_chunked best at B={first[0]} ctx={first[1]}: "
          + "; ".join(f"{g:.0f} GB/s {c}" for g, c in ranked[:top]), flush=True)
    sweep_splits(*first, ranked)
    for batch, ctx in rest:
        sweep_splits(batch, ctx, run_shape(batch, ctx, best))


# ----------------------------------------------------------------------------- prefill

def prefill(ceil: Ceilings, tiles: bool = True) -> None:
    """kernels/triton/prefill.py (new tokens' K/V by tensor descriptors) at Llama-3.1-8B's
    shapes (32q/8kv, d128), the generic kernel (every key gathered) timed beside it; each
    variant is checked against the generic kernel's output first. Tiles (unless tiles is
    False): rows {128, 256} x block_n {64, 128} x num_warps {4, 8} x num_stages {2, 3, 4} at
    causal prefills of 8K and 16K (target: 50% of the GEMM rate). Then the default tiles with
    a cached prefix: 1/2 .. 1/16 of 16K keys new, the split behind
    attention_ops.CONTIGUOUS_MIN_NEW."""
    print("\n== tune prefill: contiguous new-token K/V, Llama-3.1-8B (32q/8kv, d128)",
          flush=True)

    def run(seq: int, qlen: int, variants: list[PrefillTiles | None]) -> None:
        table, kc, vc, q, qs, sl = gqa_extend_inputs(seq, qlen, 16)
        k_new, v_new = (new_token_kv(c, table, seq, qlen, 16) for c in (kc, vc))
        flops = causal_flops(qlen, seq, 32, 128, 128)
        gen = partial(paged_attention, q, None, kc, None, vc, table, qs, sl, 16, GQA_SCALE)
        base = gen().float()
        calls = [("generic (gathered)", gen)] + [
            ("contiguous, default tiles" if t is None else
             f"rows={t.rows} block_n={t.block_n} num_warps={t.num_warps} "
             f"num_stages={t.num_stages}",
             lambda t=t: prefill_attention(q, kc, vc, k_new, v_new, table, qs, sl, 16,
                                           GQA_SCALE, tiles=t)) for t in variants]
        for label, fn in calls:
            time_variant(ceil, "tune prefill", f"q={qlen} kv={seq} {label:44s}", fn, flops,
                         "TFLOP/s", lambda out: rel_err(out, base))
        del kc, vc, q, k_new, v_new, base
        torch.cuda.empty_cache()

    if tiles:
        grid = [PrefillTiles(rows=r, block_n=n, num_warps=w, num_stages=st)
                for r in (128, 256) for n in (64, 128) for w in (4, 8) for st in (2, 3, 4)]
        for seq in (8192, 16384):
            run(seq, seq, grid)
    for qlen in (8192, 4096, 2048, 1024):
        run(16384, qlen, [None])


# ----------------------------------------------------------------------------- MoE

def moe(ceil: Ceilings) -> None:
    """Tile variants of the fused MoE at DeepSeek-V2-Lite shapes, T = 16 .. 16384 tokens."""
    print("\n== tune moe: fused MoE tiles, DeepSeek-V2-Lite (64 experts top-6)", flush=True)
    w13, w2 = moe_weights()
    variants = [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 128, 4, 4),
                (32, 128, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 64, 8, 3),
                (64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                (128, 256, 64, 8, 3), (128, 64, 64, 4, 4)]
    for t in (16, 256, 1024, 4096, 16384):
        x = torch.randn(t, 2048, dtype=BF16, device=DEV)
        wts, ids = R.moe_route(torch.randn(t, 64, device=DEV), 6, "softmax", False, None, 1, 1,
                               1.0)
        for bm, bn, bk, w, st in variants:
            if bm > 32 and t < 256 or bm < 64 and t > 4096:
                continue
            tiles = MoeTiles(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
            fn = partial(TM.fused_moe, x, w13, w2, wts, ids, tiles=tiles)
            time_variant(ceil, "tune moe", f"T={t:6d} M={bm} N={bn} K={bk} w={w} s={st}", fn,
                         6.0 * t * 6 * 1408 * 2048, "TFLOP/s")


def moe_decode(ceil: Ceilings) -> None:
    """Tile variants of the fused MoE at batch 1 (DeepSeek-V2-Lite: one token, top-6 of 64
    experts, each pair its own row block), the rule's tiles first: the 6 experts' weights
    streamed, GB/s against copy."""
    print("\n== tune moe-decode: fused MoE tiles at batch 1, DeepSeek-V2-Lite", flush=True)
    w13, w2 = moe_weights()
    x = torch.randn(1, 2048, dtype=BF16, device=DEV)
    wts, ids = R.moe_route(torch.randn(1, 64, device=DEV), 6, "softmax", False, None, 1, 1, 1.0)
    nbytes = 6 * 3 * 1408 * 2048 * 2
    rule = partial(TM.fused_moe, x, w13, w2, wts, ids)
    err_of = max_err_against(rule())
    time_variant(ceil, "tune moe-decode", "rule", rule, nbytes, "GB/s")
    for bn, bk, w, st in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4, 6)):
        tiles = MoeTiles(block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
        time_variant(ceil, "tune moe-decode", f"N={bn:3d} K={bk:3d} w={w} s={st}",
                     partial(TM.fused_moe, x, w13, w2, wts, ids, tiles=tiles), nbytes, "GB/s",
                     err_of)


# ----------------------------------------------------------------------------- split-KV

def splits(ceil: Ceilings) -> None:
    """Split-KV sizing (split_kv.SplitSizing): the fewest KV tiles per split for short rows in
    32K-wide page tables, as CUDA graphs pad them, then split counts for whole rows."""
    split_tiles(ceil)
    split_counts(ceil)


def _split_tiles_row(label: str, call: Callable[[int], object]) -> None:
    cells = [f"{t} tiles {graph_ms(lambda t=t: call(t)) * 1e3:6.1f}us" for t in (1, 2, 4)]
    print(f"  tune split tiles {label}: " + "  ".join(cells), flush=True)


def split_tiles(ceil: Ceilings) -> None:
    """Tiles per split at 1 / 2 / 4, batch 1..64 x context 256..4096 in 32K-wide tables: MLA
    decode (DeepSeek-V2-Lite, page size 64) and GQA decode (Llama-3.1-8B, page size 16)."""
    print("\n== tune splits: tiles per split, short rows in 32K-wide page tables", flush=True)
    width = 32768
    for batch in (1, 2, 4, 8, 16, 32, 64):
        table, cache, ql, qr, _ = mla_inputs(batch, width, 64, 16)
        for ctx in (256, 1024, 4096):
            sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            _split_tiles_row(f"mla B={batch:3d} ctx={ctx:5d}", lambda t: mla_decode_chunked(
                ql, qr, cache, table, sl, 64, MLA_SCALE, split_tiles=t))
        del table, cache, ql, qr
    for batch in (1, 2, 4, 8, 16, 32):
        table, k, v, q, _ = gqa_inputs(batch, width, 16)
        for ctx in (256, 1024, 4096):
            sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            _split_tiles_row(f"gqa B={batch:3d} ctx={ctx:5d}", lambda t: paged_attention(
                q, None, k, None, v, table, None, sl, 16, GQA_SCALE, split_tiles=t))
        del k, v
    torch.cuda.empty_cache()


MLA_SPLIT_SHAPES = [(b, c) for b in (1, 2, 4, 8, 16, 32, 64) for c in (4096, 8192, 32768)
                    if b * c <= 64 * 32768] + [(128, 4096), (256, 4096)]
GQA_SPLIT_SHAPES = [(b, c) for b in (1, 4, 16, 64) for c in (8192, 32768)] + [(256, 4096)]
SPLIT_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def split_counts(ceil: Ceilings) -> None:
    """Split-KV pieces per row for decode over whole rows in a 32K-wide page table (the
    CUDA-graph case): the sizing rule's count (`rule`) against fixed counts of 1..256, each
    split at least one tile; % of copy per cell, best marked. MLA: DeepSeek-V2-Lite (page size
    64, the chunked kernel's 64-key tiles); GQA: Llama-3.1-8B (page size 16)."""
    print("\n== tune splits: split counts, whole rows in 32K-wide page tables", flush=True)
    width, dev, rule = 32768, torch.device(DEV), DEFAULT_SIZING
    for batch, ctx in MLA_SPLIT_SHAPES:
        table, cache, ql, qr, _ = mla_inputs(batch, width, 64, 16)
        sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        _split_count_row(ceil, f"mla B={batch:3d} ctx={ctx:5d}", ctx, 64,
                         mla_cache_bytes(batch, ctx),
                         (rule.decode_splits(batch, width, 64, dev, True),
                          rule.tiles_per_split(batch, True)),
                         lambda n, t: mla_decode_chunked(ql, qr, cache, table, sl, 64, MLA_SCALE,
                                                         num_splits=n, split_tiles=t))
        del table, cache, ql, qr
    block_n = attention_tiles(True, False, 4).block_n
    for batch, ctx in GQA_SPLIT_SHAPES:
        table, k, v, q, _ = gqa_inputs(batch, width, 16)
        sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        _split_count_row(ceil, f"gqa B={batch:3d} ctx={ctx:5d}", ctx, block_n,
                         _gqa_decode_bytes(batch, ctx),
                         (rule.decode_splits(batch * 8, width, block_n, dev, False), 1),
                         lambda n, t: paged_attention(q, None, k, None, v, table, None, sl, 16,
                                                      GQA_SCALE, num_splits=n, split_tiles=t))
        del table, k, v, q
    torch.cuda.empty_cache()


def _split_count_row(ceil: Ceilings, label: str, ctx: int, block_n: int, nbytes: int,
                     rule: tuple[int, int],
                     call: Callable[[int | None, int | None], object]) -> None:
    cells = {"rule": graph_ms(lambda: call(None, None), captures=1)}
    for n in SPLIT_COUNTS:
        if n * block_n <= ctx:
            cells[str(n)] = graph_ms(lambda n=n: call(n, 1), captures=1)
    best = min(cells, key=cells.get)
    print(f"  tune splits {label}: " + "  ".join(
        f"{k}{'*' if k == best else ''} {nbytes / v / 1e6 / ceil.copy_gbs:4.0%}"
        for k, v in cells.items()) + f"  (best {cells[best] * 1e3:.1f}us, rule "
        f"{cells['rule'] * 1e3:.1f}us = {rule[0]} splits of >= {rule[1]} tiles)", flush=True)

