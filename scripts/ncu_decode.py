"""One decode-attention launch configuration, run a few times for a profiler to read (Nsight
Compute: scripts/gpu_ncu_decode): Llama-3.1-8B's heads (32 query heads of 128 over 8 KV
heads), B rows of `context` keys each on shuffled 16-token pages, a bf16 or FP8 (e4m3) cache,
through the op the decode graph calls (`gqa_decode`, default tiles and splits). Each launch is
checked against the torch reference once, so a profiled variant is a correct one.

    python scripts/ncu_decode.py --kv fp8 --batch 256 --context 2048 [--launches 4]
"""
from __future__ import annotations

import argparse

import torch

from kernels import reference as R
from kernels.reference.kv_cache import FP8_KV_DTYPE, quantize
from kernels.triton.gqa_decode import gqa_decode

HQ, HK, D, PAGE = 32, 8, 128, 16
SCALE = 0.02          # the FP8 cache's k_scale and v_scale
TOL = 2e-2


def paged_cache(batch: int, context: int, fp8: bool, device: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(page table [B, P], K cache, V cache, seq_lens [B]): rows on shuffled pages."""
    pages = batch * (context // PAGE)
    table = torch.randperm(pages, device=device, dtype=torch.int32).view(batch, -1)
    kc = torch.randn(pages * PAGE, HK, D, device=device, dtype=torch.bfloat16)
    vc = torch.randn(pages * PAGE, HK, D, device=device, dtype=torch.bfloat16)
    if fp8:
        kc = quantize(kc * SCALE, FP8_KV_DTYPE, SCALE)
        vc = quantize(vc * SCALE, FP8_KV_DTYPE, SCALE)
    lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    return table, kc, vc, lens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kv", choices=("bf16", "fp8"), default="fp8")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--launches", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    fp8 = args.kv == "fp8"
    table, kc, vc, lens = paged_cache(args.batch, args.context, fp8, args.device)
    q = torch.randn(args.batch, HQ, D, device=args.device, dtype=torch.bfloat16)
    scales = dict(k_scale=SCALE, v_scale=SCALE) if fp8 else {}
    ref = R.decode_attention(q, kc, vc, table, lens, PAGE, D ** -0.5, **scales)
    for _ in range(args.launches):
        out = gqa_decode(q, kc, vc, table, lens, PAGE, D ** -0.5, **scales)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"gqa_decode {args.kv} B={args.batch} ctx={args.context}: rel. err {err:.1e}")
    return 0 if err < TOL else 1


if __name__ == "__main__":
    raise SystemExit(main())
