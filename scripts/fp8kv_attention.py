"""FP8 (e4m3) against bf16 KV caches on a GPU, at Llama-3.1-8B's attention shape (32 query heads
of 128 over 8 KV heads, 16-token pages): part (a) of scripts/gpu_fp8kv.

1. The cache writers (store_kv, rope_store_kv) write the bytes torch's cast gives (the GPU's
   `cvt.rn.satfinite` against the reference's round-to-nearest-even, saturated).
2. Decode attention (`_paged_attn_kernel`, split-KV as the op sizes it) at B x context for a
   bf16 and an FP8 cache: checked against the torch reference over the same cache, timed as a
   CUDA-graph replay with the L2 flushed (what it costs inside the decode graph), with the K/V
   bytes it reads per second beside the device copy bandwidth measured in this run.
3. Extend attention over an FP8 prefix, both kernels (gathered; contiguous new tokens), against
   the reference.
4. `--sweep`: decode tiles (keys per tile, warps, stages) at B=256 x 2048 for both caches: an
   FP8 tile of 64 keys moves half the bytes of a bf16 one per load, so its best tile may differ.
5. `--gqa-sweep B:CTX ...`: the kernel the decode graphs launch (`gqa_decode`, FP8 values
   read as words) at each shape: its default tiles and a few others; the default tiles with
   the keys split (`--splits`, for the last wave of programs).

    python scripts/fp8kv_attention.py [--batches 1 64 256] [--contexts 1024 2048]
"""
from __future__ import annotations

import argparse

import torch
from kernel_bench.harness import graph_ms, measure_ceilings, rel_err

from kernels import reference as R
from kernels.reference.kv_cache import FP8_KV_DTYPE, quantize
from kernels.triton import attention_ops as A
from kernels.triton.attention import AttentionTiles, attention_tiles, paged_attention
from kernels.triton import rope_kv as RK
from kernels.triton.gqa_decode import gqa_decode

DEV, BF16, F8 = "cuda", torch.bfloat16, FP8_KV_DTYPE
HQ, HK, D, PAGE = 32, 8, 128, 16
TOL = 2e-2      # bf16 operands in the kernel's dots; the reference computes in float32
K_SCALE, V_SCALE = 0.02, 0.01


def check_writers() -> list[str]:
    """The Triton writers' FP8 bytes == torch's cast of the same values."""
    failures = []
    t = 4096
    k = torch.randn(t, HK, D, device=DEV, dtype=BF16) * 4
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 31.1 * K_SCALE, 34 * K_SCALE])  # saturate; carry; tie
    v = torch.randn(t, HK, D, device=DEV, dtype=BF16)
    q = torch.randn(t, HQ, D, device=DEV, dtype=BF16)
    slots = torch.randperm(2 * t, device=DEV)[:t]
    cos_sin = torch.randn(8192, D, device=DEV)
    pos = torch.randint(0, 8192, (t,), device=DEV)
    for name in ("store_kv", "rope_store_kv"):
        got = [torch.zeros(2 * t, HK, D, device=DEV, dtype=F8) for _ in range(2)]
        ref = [torch.zeros(2 * t, HK, D, device=DEV, dtype=F8) for _ in range(2)]
        if name == "store_kv":
            RK.store_kv(k, v, *got, slots, K_SCALE, V_SCALE)
            R.store_kv(k, v, *ref, slots, K_SCALE, V_SCALE)
        else:
            RK.rope_store_kv(q, k, v, pos, cos_sin, D, True, *got, slots, K_SCALE, V_SCALE)
            R.rope_store_kv(q, k, v, pos, cos_sin, D, True, *ref, slots, K_SCALE, V_SCALE)
        for what, a, b in (("k", got[0], ref[0]), ("v", got[1], ref[1])):
            differ = (a.view(torch.uint8) != b.view(torch.uint8)).float().mean().item()
            nan = torch.isnan(a.float()).any().item()
            # rope_store_kv quantizes the rotation's float32, the reference its bf16 rounding
            ok = not nan and (differ == 0 or (name == "rope_store_kv" and what == "k"
                                              and differ < 0.05))
            print(f"  {name} {what}: {differ:.2%} of bytes differ from torch's cast"
                  f"{', NaN!' if nan else ''} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{name} {what}")
    return failures


def paged_cache(batch: int, context: int, kv_dtype: torch.dtype, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of `context` keys on shuffled pages: page table [B, P], K/V caches, seq_lens."""
    pages = batch * (context // PAGE)
    table = torch.randperm(pages, device=DEV, dtype=torch.int32).view(batch, -1)
    kc = torch.randn(pages * PAGE, HK, D, device=DEV, dtype=BF16)
    vc = torch.randn(pages * PAGE, HK, D, device=DEV, dtype=BF16)
    if kv_dtype == F8:
        kc, vc = quantize(kc * scale, F8, scale), quantize(vc * scale, F8, scale)
    lens = torch.full((batch,), context, device=DEV, dtype=torch.int32)
    return table, kc, vc, lens


def decode_rows(batches: list[int], contexts: list[int], copy_gbs: float) -> list[str]:
    failures = []
    print(f"\n  {'B':>4} {'ctx':>5} {'cache':>6} {'us':>8} {'GB/s':>7} {'% copy':>7} "
          f"{'speed-up':>8} {'rel.err':>8}")
    for batch in batches:
        for context in contexts:
            base = None
            for kv, scale in ((BF16, 1.0), (F8, K_SCALE)):
                table, kc, vc, lens = paged_cache(batch, context, kv, scale)
                q = torch.randn(batch, HQ, D, device=DEV, dtype=BF16)
                opts = dict(k_scale=scale, v_scale=scale) if kv == F8 else {}
                out = A.decode_attention(q, kc, vc, table, lens, PAGE, D ** -0.5, **opts)
                err = rel_err(out, R.decode_attention(q, kc, vc, table, lens, PAGE, D ** -0.5,
                                                      **opts))
                ms = graph_ms(lambda: A.decode_attention(q, kc, vc, table, lens, PAGE,
                                                         D ** -0.5, **opts))
                nbytes = 2 * batch * context * HK * D * kc.element_size()   # K and V read
                gbs = nbytes / ms / 1e6
                base = ms if base is None else base
                ok = err < TOL
                print(f"  {batch:>4} {context:>5} {'fp8' if kv == F8 else 'bf16':>6} "
                      f"{ms * 1e3:8.1f} {gbs:7.0f} {gbs / copy_gbs:7.1%} {base / ms:7.2f}x "
                      f"{err:8.1e}{'' if ok else '  FAIL'}")
                if not ok:
                    failures.append(f"decode B={batch} ctx={context} {kv}")
                del table, kc, vc
    return failures


def tile_sweep(batch: int = 256, context: int = 2048) -> None:
    """Decode time per tile shape, bf16 and FP8 caches (the default tile first)."""
    default = attention_tiles(decode=True, mla=False, group=HQ // HK)
    shapes = [default] + [AttentionTiles(default.g_blk, 1, n, w, st)
                          for n in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)
                          if (n, w, st) != (default.block_n, default.num_warps, default.num_stages)]
    print(f"  B={batch} ctx={context}: us per tile shape (block_n, warps, stages)")
    for kv, scale in ((BF16, 1.0), (F8, K_SCALE)):
        table, kc, vc, lens = paged_cache(batch, context, kv, scale)
        q = torch.randn(batch, HQ, D, device=DEV, dtype=BF16)
        ref = R.decode_attention(q, kc, vc, table, lens, PAGE, D ** -0.5, k_scale=scale,
                                 v_scale=scale)
        cells = []
        for t in shapes:
            def run(t=t):
                return paged_attention(q, None, kc, None, vc, table, None, lens, PAGE, D ** -0.5,
                                       tiles=t, k_scale=scale, v_scale=scale)
            try:
                ok = rel_err(run(), ref) < TOL
                cells.append(f"({t.block_n},{t.num_warps},{t.num_stages}) "
                             f"{graph_ms(run) * 1e3:.1f}{'' if ok else ' FAIL'}")
            except Exception as e:  # noqa: BLE001 - a shape the GPU cannot run (shared memory)
                cells.append(f"({t.block_n},{t.num_warps},{t.num_stages}) {type(e).__name__}")
        print(f"  {'fp8' if kv == F8 else 'bf16':>5}: " + "; ".join(cells))
        del table, kc, vc


GQA_TILES = [(64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 8, 2)]


def gqa_variants(default: AttentionTiles, splits: list[int]) -> list[tuple]:
    """(name, tiles, split count) of --gqa-sweep: the default, each of GQA_TILES, then forced
    split counts at the default tiles."""
    return ([("default", default, None)]
            + [(f"{n}/{w}/{st}", AttentionTiles(default.g_blk, 1, n, w, st), None)
               for n, w, st in GQA_TILES]
            + [(f"split{s}", default, s) for s in splits])


def gqa_sweep(shapes: list[str], splits: list[int]) -> list[str]:
    """gqa_decode's us per variant (`gqa_variants`) at each B:CTX, both caches; K/V GB/s of
    the best beside it. Each variant checked against the reference."""
    failures = []
    for shape in shapes:
        batch, context = map(int, shape.split(":"))
        for kv, scale in ((BF16, 1.0), (F8, K_SCALE)):
            table, kc, vc, lens = paged_cache(batch, context, kv, scale)
            q = torch.randn(batch, HQ, D, device=DEV, dtype=BF16)
            ref = R.decode_attention(q, kc, vc, table, lens, PAGE, D ** -0.5, k_scale=scale,
                                     v_scale=scale)
            default = attention_tiles(True, False, HQ // HK, batch, fp8=kv == F8, v_words=True)
            cells, best = [], None
            for name, tiles, n_split in gqa_variants(default, splits):
                def run(tiles=tiles, n_split=n_split):
                    return gqa_decode(q, kc, vc, table, lens, PAGE, D ** -0.5, n_split,
                                      tiles=tiles, k_scale=scale, v_scale=scale)
                try:
                    ok = rel_err(run(), ref) < TOL
                    us = graph_ms(run) * 1e3
                    if ok and (best is None or us < best):
                        best = us
                    cells.append(f"{name} {us:.1f}{'' if ok else ' FAIL'}")
                    if not ok:
                        failures.append(f"gqa {shape} {kv} {name}")
                except Exception as e:  # noqa: BLE001 - a shape the GPU cannot run
                    cells.append(f"{name} {type(e).__name__}")
            name = "fp8" if kv == F8 else "bf16"
            best_line = "no variant correct" if best is None else (
                f"best {best:.1f} us, "
                f"{2 * batch * context * HK * D * kc.element_size() / best / 1e3:.0f} GB/s")
            print(f"  {shape} {name} (default {default.block_n}/{default.num_warps}/"
                  f"{default.num_stages}; {best_line}): " + "; ".join(cells))
            del table, kc, vc
    return failures


def extend_rows() -> list[str]:
    """An FP8 prefix of 1500 keys + 300 new tokens a row (the gathering kernel), and 64 + 2000
    (mostly new: the contiguous prefill kernel), against the reference."""
    failures = []
    for prefix, new in ((1500, 300), (64, 2000)):
        rows, n = 2, prefix + new
        table, kc, vc, lens = paged_cache(rows, -(-n // PAGE) * PAGE, F8, K_SCALE)
        lens.fill_(n)
        slots = torch.cat([(table[b, torch.arange(prefix, n, device=DEV) // PAGE].long() * PAGE
                            + torch.arange(prefix, n, device=DEV) % PAGE) for b in range(rows)])
        k_new = (kc[slots].float() * K_SCALE).to(BF16)
        v_new = (vc[slots].float() * K_SCALE).to(BF16)
        q = torch.randn(rows * new, HQ, D, device=DEV, dtype=BF16)
        qs = torch.arange(0, rows * new + 1, new, device=DEV, dtype=torch.int32)
        kw = dict(k_scale=K_SCALE, v_scale=K_SCALE)
        contiguous = A.use_contiguous(q, k_new, v_new, table, PAGE)
        out = A.extend_attention(q, kc, vc, table, qs, lens, PAGE, D ** -0.5, k_new=k_new,
                                 v_new=v_new, **kw)
        ref = R.extend_attention(q, kc, vc, table, qs, lens, PAGE, D ** -0.5, **kw)
        err = rel_err(out, ref)
        ok = err < TOL
        kernel = "contiguous" if contiguous else "gathering"
        print(f"  extend, FP8 prefix {prefix} + {new} new ({kernel} kernel): rel.err {err:.1e} "
              f"{'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"extend {prefix}+{new}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--sweep", action="store_true", help="decode tile shapes (4.)")
    parser.add_argument("--gqa-sweep", nargs="*", metavar="B:CTX",
                        help="gqa_decode's tiles at these shapes (5.), then exit")
    parser.add_argument("--splits", type=int, nargs="*", default=[2],
                        help="forced split counts in --gqa-sweep")
    args = parser.parse_args()
    torch.manual_seed(0)
    ceil = measure_ceilings()
    print(f"{torch.cuda.get_device_name()}: {ceil.line()}")
    if args.gqa_sweep is not None:
        print("gqa_decode tiles (block_n/warps/stages), us a launch, CUDA graph, L2 flushed:")
        failures = gqa_sweep(args.gqa_sweep or ["256:2048", "128:2048", "64:2048"], args.splits)
        print(f"\ngqa sweep checks: {'all ok' if not failures else 'FAILED: ' + ', '.join(failures)}")
        return 1 if failures else 0
    print("cache writers (FP8 bytes against torch's cast):")
    failures = check_writers()
    print("decode attention, Llama-3.1-8B heads (32 x 128 over 8 KV heads), CUDA graph, L2 "
          "flushed; GB/s = K+V bytes read")
    failures += decode_rows(args.batches, args.contexts, ceil.copy_gbs)
    print("extend attention over an FP8 cache:")
    failures += extend_rows()
    if args.sweep:
        print("decode tile sweep:")
        tile_sweep()
    print(f"\nkernel checks: {'all ok' if not failures else 'FAILED: ' + ', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
