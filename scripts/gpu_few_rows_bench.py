"""Linear layers of a few rows on one GPU: cuBLAS (F.linear) against kernels/triton/few_rows.py.

For each row count and each weight shape of a preset's decode step (default: Llama-3.1-8B's
qkv, o, gate_up, down and lm_head), a CUDA graph calls the op on enough distinct weight copies
that every call reads its weight from HBM, as a decode step of a few streams does (the timing
of scripts/gpu_gemv_bench.py). Prints, per (rows, shape), cuBLAS, the few-rows kernel as
`few_rows_config` tiles it (the rule, where it has one) and the best few configurations swept
(row tiles: `row_tiles`): microseconds a call, the weight bytes a second against the copy
bandwidth measured in the same run, and the speed-up over cuBLAS. Every configuration is
checked against F.linear first. Last, per row count, a step's sum (every shape but the head
`--layers` times): cuBLAS against the best swept.

    python scripts/gpu_few_rows_bench.py                      # ~2 minutes on an H100
    python scripts/gpu_few_rows_bench.py --rows 4 16 --shapes 4096x4096 --top 5
    python scripts/gpu_few_rows_bench.py --rows 32 64 --block-n 32 64 128 256 --block-k 128 256 --warps 4 8
    python scripts/gpu_few_rows_bench.py --cublas-only --rows 96 128 160 192 256 --top 0
    python scripts/gpu_few_rows_bench.py --silu --rows 2 4 16 32 64

`--silu`: the MLP's gate_up with its SiLU at each row count, three ways: cuBLAS then the
silu_and_mul kernel, the few-rows kernel then silu_and_mul (what 2-64 rows ran before), and
the few-rows kernel with silu_and_mul in its epilogue (`linear_silu_and_mul` now), checked
bit for bit against the two kernels.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_gemv_bench import (LLAMA_8B, copy_tbps, graph_us, table_lines,  # noqa: E402
                            timed_configs, weight_copies)
from kernels.triton.elementwise import silu_and_mul  # noqa: E402
from kernels.triton.few_rows import (MAX_ROWS, FewRowsConfig, few_rows_config,  # noqa: E402
                                     few_rows_linear)


def _label(cfg: FewRowsConfig) -> str:
    return f"{cfg.block_m}:{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def row_tiles(rows: int, asked: list[int] | None) -> list[int]:
    """The row tiles swept at `rows`: those asked, else one tile of all the rows (a power of
    two, at least 16) and, from 128 rows, two tiles of half of them."""
    if asked:
        return asked
    whole = max(16, 1 << (rows - 1).bit_length())
    return [whole] + ([whole // 2] if whole >= 128 else [])


def bench(name: str, rows: int, n: int, k: int, cfgs: list[FewRowsConfig], replays: int,
          top: int, copy: float) -> list[str]:
    weights = weight_copies(n, k)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, weights[0]).float()
    results = [("cuBLAS", graph_us(F.linear, weights, x, replays))]
    rule = few_rows_config(n, k, rows) if rows <= MAX_ROWS else None
    if rule is not None:
        results.append((f"rule {_label(rule)}", graph_us(
            lambda a, w: few_rows_linear(a, w, None, rule), weights, x, replays)))
    timed = timed_configs(f"{name} M={rows}", cfgs,
                          lambda a, w, c: few_rows_linear(a, w, None, c), _label, weights, x,
                          want, replays)
    results += sorted(timed, key=lambda r: r[1])   # without a rule the best takes its row
    lines = table_lines(f"{rows} | {name} {n}x{k}", results, n * k * 2, top, copy)
    del weights
    torch.cuda.empty_cache()
    print("\n".join(lines), flush=True)
    return lines, results[0][1], min(us for _, us in results)


def silu_rows(rows_list: list[int], n: int, k: int, replays: int, copy: float) -> list[str]:
    """gate_up [n, k] then SiLU at each row count: cuBLAS + silu_and_mul, few-rows +
    silu_and_mul, few-rows with its SILU_MUL epilogue (checked equal to the two kernels)."""
    weights = weight_copies(n, k)
    lines = []
    for rows in rows_list:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        fused = few_rows_linear(x, weights[0], silu_mul=True)
        same = torch.equal(fused, silu_and_mul(few_rows_linear(x, weights[0])))
        results = [
            ("cuBLAS + silu_and_mul", graph_us(lambda a, w: silu_and_mul(F.linear(a, w)),
                                               weights, x, replays)),
            ("few-rows + silu_and_mul", graph_us(
                lambda a, w: silu_and_mul(few_rows_linear(a, w)), weights, x, replays)),
            (f"few-rows SILU_MUL{'' if same else ' (NOT EQUAL)'}", graph_us(
                lambda a, w: few_rows_linear(a, w, silu_mul=True), weights, x, replays))]
        lines += table_lines(f"{rows} | gate_up+SiLU {n}x{k}", results, n * k * 2, 1, copy)
        print(lines[-1], flush=True)
    del weights
    torch.cuda.empty_cache()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--shapes", nargs="+", default=None, help="NxK ... (default: the 8B's)")
    parser.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--block-k", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[4])
    parser.add_argument("--block-m", type=int, nargs="+", default=None,
                        help="row tiles (default: row_tiles)")
    parser.add_argument("--cublas-only", action="store_true",
                        help="no kernel of ours: cuBLAS's step at each row count (graph buckets)")
    parser.add_argument("--layers", type=int, default=32,
                        help="a step's sum: every shape but lm_head this many times")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--silu", action="store_true",
                        help="gate_up with its SiLU: two launches against one (module doc)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_few_rows_bench: needs a CUDA device", file=sys.stderr)
        return 1
    names = {f"{n}x{k}": name for name, (n, k) in LLAMA_8B.items()}
    shapes = args.shapes or list(names)
    copy = copy_tbps()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"copy {copy:.2f} TB/s", flush=True)
    lines = ["| rows | shape | kernel | us a call | TB/s | of copy | vs cuBLAS |",
             "|---|---|---|---|---|---|---|"]
    if args.silu:
        n, k = LLAMA_8B["gate_up"]
        print("\n" + "\n".join(lines + silu_rows(args.rows, n, k, args.replays, copy)))
        return 0
    steps = ["| rows | cuBLAS us a step | best tiles us a step | speed-up |", "|---|---|---|---|"]
    for rows in args.rows:
        cfgs = [FewRowsConfig(n, k, w, s, m) for m, n, k, w, s in itertools.product(
            row_tiles(rows, args.block_m), args.block_n, args.block_k, args.warps,
            args.stages)] if not args.cublas_only else []
        base = best = 0.0
        for shape in shapes:
            n, k = (int(v) for v in shape.split("x"))
            name = names.get(shape, shape)
            shape_lines, base_us, best_us = bench(name, rows, n, k, cfgs, args.replays,
                                                  args.top, copy)
            lines += shape_lines
            times = 1 if name == "lm_head" else args.layers
            base, best = base + times * base_us, best + times * best_us
        steps.append(f"| {rows} | {base:.0f} | {best:.0f} | {base / best:.3f}x |")
    print("\n" + "\n".join(lines + [""] + steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
