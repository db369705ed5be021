"""One decode-attention launch configuration, run a few times for a profiler to read (Nsight
Compute: scripts/gpu_ncu_decode): Llama-3.1-8B's heads (32 query heads of 128 over 8 KV
heads), B rows of `context` keys each on shuffled 16-token pages (fp8kv_attention.py's
cache), a bf16 or FP8 (e4m3) cache, through the op the decode graph calls (`gqa_decode`,
default tiles and splits). The last launch is checked against the torch reference, so a
profiled variant is a correct one.

    python scripts/ncu_decode.py --kv fp8 --batch 256 --context 2048 [--launches 4]
"""
from __future__ import annotations

import argparse

import torch
from fp8kv_attention import BF16, D, F8, HQ, K_SCALE, PAGE, TOL, paged_cache

from kernels import reference as R
from kernels.triton.gqa_decode import gqa_decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kv", choices=("bf16", "fp8"), default="fp8")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--launches", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    kv, scale = (F8, K_SCALE) if args.kv == "fp8" else (BF16, 1.0)
    table, kc, vc, lens = paged_cache(args.batch, args.context, kv, scale)
    q = torch.randn(args.batch, HQ, D, device=kc.device, dtype=BF16)
    for _ in range(args.launches):
        out = gqa_decode(q, kc, vc, table, lens, PAGE, D ** -0.5, k_scale=scale, v_scale=scale)
    ref = R.decode_attention(q, kc, vc, table, lens, PAGE, D ** -0.5, k_scale=scale,
                             v_scale=scale)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"gqa_decode {args.kv} B={args.batch} ctx={args.context}: rel. err {err:.1e}")
    return 0 if err < TOL else 1


if __name__ == "__main__":
    raise SystemExit(main())
