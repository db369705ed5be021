"""Linear layers of 2-16 rows on one GPU: cuBLAS (F.linear) against kernels/triton/few_rows.py.

For each row count and each weight shape of a preset's decode step (default: Llama-3.1-8B's
qkv, o, gate_up, down and lm_head), a CUDA graph calls the op on enough distinct weight copies
that every call reads its weight from HBM, as a decode step of a few streams does (the timing
of scripts/gpu_gemv_bench.py). Prints, per (rows, shape), cuBLAS, the few-rows kernel as
`few_rows_config` tiles it (the rule) and the best few configurations swept: microseconds a
call, the weight bytes a second against the copy bandwidth measured in the same run, and the
speed-up over cuBLAS. Every configuration is checked against F.linear first.

    python scripts/gpu_few_rows_bench.py                      # ~2 minutes on an H100
    python scripts/gpu_few_rows_bench.py --rows 4 16 --shapes 4096x4096 --top 5
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_gemv_bench import LLAMA_8B, STREAM_BYTES, copy_tbps, graph_us  # noqa: E402
from kernels.triton.few_rows import FewRowsConfig, few_rows_config, few_rows_linear  # noqa: E402


def _label(cfg: FewRowsConfig) -> str:
    return f"{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def bench(name: str, rows: int, n: int, k: int, cfgs: list[FewRowsConfig], replays: int,
          top: int, copy: float) -> list[str]:
    bytes_ = n * k * 2
    copies = max(2, -(-STREAM_BYTES // bytes_))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
               for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, weights[0]).float()
    rule = few_rows_config(n, k)
    results = [("cuBLAS", graph_us(F.linear, weights, x, replays)),
               (f"rule {_label(rule)}",
                graph_us(lambda a, w: few_rows_linear(a, w, None, rule), weights, x, replays))]
    for cfg in cfgs:
        try:
            got = few_rows_linear(x, weights[0], None, cfg)
        except OutOfResources:   # its pipeline's buffers exceed the shared memory
            continue
        err = (got.float() - want).abs().max().item()
        if err > 0.02 * want.abs().max().item() + 1e-3:
            print(f"{name} M={rows} {_label(cfg)}: WRONG, max error {err:.4g}", flush=True)
            continue
        results.append((_label(cfg), graph_us(lambda a, w, c=cfg: few_rows_linear(a, w, None, c),
                                              weights, x, replays)))
    base = results[0][1]
    lines = []
    for label, us in results[:2] + sorted(results[2:], key=lambda r: r[1])[:top]:
        tbps = bytes_ / (us * 1e-6) / 1e12
        lines.append(f"| {rows} | {name} {n}x{k} | {label} | {us:.2f} | {tbps:.2f} | "
                     f"{tbps / copy:.0%} | {base / us:.2f}x |")
    del weights
    torch.cuda.empty_cache()
    print("\n".join(lines), flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--shapes", nargs="+", default=None, help="NxK ... (default: the 8B's)")
    parser.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--block-k", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[4])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--top", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_few_rows_bench: needs a CUDA device", file=sys.stderr)
        return 1
    names = {f"{n}x{k}": name for name, (n, k) in LLAMA_8B.items()}
    shapes = args.shapes or list(names)
    cfgs = [FewRowsConfig(n, k, w, s) for n, k, w, s in itertools.product(
        args.block_n, args.block_k, args.warps, args.stages)]
    copy = copy_tbps()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"copy {copy:.2f} TB/s", flush=True)
    lines = ["| rows | shape | kernel | us a call | TB/s | of copy | vs cuBLAS |",
             "|---|---|---|---|---|---|---|"]
    for rows in args.rows:
        for shape in shapes:
            n, k = (int(v) for v in shape.split("x"))
            lines += bench(names.get(shape, shape), rows, n, k, cfgs, args.replays, args.top,
                           copy)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
