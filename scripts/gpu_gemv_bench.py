"""Few-row linear layers on one GPU: cuBLAS (F.linear) against kernels/triton/gemv.py.

For each weight shape of a preset's decode step (default: Llama-3.1-8B's qkv, o, gate_up,
down and lm_head), a CUDA graph calls the op on enough distinct weight copies that every call
reads its weight from HBM, as a decode step does; replayed, timed with CUDA events; for x of
1, 2, 4 and 8 rows (a decode step of B rows, a verify step of one row's 1 + k tokens). Prints,
per shape, cuBLAS and the best few GEMV configurations: microseconds a call and the weight
bytes a second, against the copy bandwidth measured in the same run (a device-to-device copy
of 1 GiB). Checks every configuration against F.linear first.

    python scripts/gpu_gemv_bench.py                 # ~2 minutes on an H200
    python scripts/gpu_gemv_bench.py --shapes 4096x4096 --top 5
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.triton import elementwise  # noqa: E402
from kernels.triton.gemv import GemvConfig, gemv, norm_gemv  # noqa: E402

LLAMA_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
            "down": (4096, 14336), "lm_head": (128256, 4096)}
STREAM_BYTES = 1 << 30  # weight copies per graph: at least this much, well past the L2


def graph_us(fn, weights: list[torch.Tensor], x: torch.Tensor, replays: int) -> float:
    """Microseconds a call, fn(x, w) over every w in a CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in weights[:2]:
            fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for w in weights:
            fn(x, w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(weights))


def copy_tbps() -> float:
    src = torch.empty(STREAM_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * STREAM_BYTES * 10 / (start.elapsed_time(end) * 1e-3) / 1e12


def configs(args, rows: int) -> list[GemvConfig]:
    if rows == 1:
        grid = (args.block_n, args.block_k, args.warps, args.stages)
    else:  # the few-rows kernel's MMA wants wider N tiles and shorter K steps
        grid = (args.rows_block_n, args.rows_block_k, args.warps, args.stages)
    return [GemvConfig(n, k, w, s) for n, k, w, s in itertools.product(*grid)]


def bench_shape(name: str, n: int, k: int, rows: int, cfgs: list[GemvConfig], replays: int,
                top: int, copy: float) -> list[str]:
    bytes_ = n * k * 2
    copies = max(2, -(-STREAM_BYTES // bytes_))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
               for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, weights[0]).float()
    results = [("cuBLAS", graph_us(lambda a, w: F.linear(a, w), weights, x, replays))]
    for cfg in cfgs:
        err = (gemv(x, weights[0], None, cfg).float() - want).abs().max().item()
        if err > 0.02 * want.abs().max().item() + 1e-3:
            print(f"{name} {cfg}: WRONG, max error {err:.4g}", flush=True)
            continue
        results.append((f"gemv {cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}",
                        graph_us(lambda a, w, c=cfg: gemv(a, w, None, c), weights, x, replays)))
    base = results[0][1]
    best = sorted(results[1:], key=lambda r: r[1])[:top]
    lines = []
    for label, us in [results[0]] + best:
        tbps = bytes_ / (us * 1e-6) / 1e12
        lines.append(f"| {name} {n}x{k} | {rows} | {label} | {us:.2f} | {tbps:.2f} | {tbps / copy:.0%} | "
                     f"{base / us:.2f}x |")
    del weights
    torch.cuda.empty_cache()
    print("\n".join(lines), flush=True)
    return lines


def bench_norm(name: str, n: int, k: int, silu: bool, replays: int, copy: float) -> list[str]:
    """One row through RMSNorm (+ residual add) into an [N, K] weight (+ SiLU-and-mul of the
    halves): the norm kernel, then cuBLAS or the GEMV (then the activation kernel), against
    add_rms_norm_linear's one kernel."""
    bytes_ = n * k * 2
    copies = max(2, -(-STREAM_BYTES // bytes_))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
               for _ in range(copies)]
    x, r = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    g = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5

    def separate(a, w, matmul):
        normed, _ = elementwise.fused_add_rms_norm(a, r, g, 1e-5)
        y = matmul(normed, w)
        return elementwise.silu_and_mul(y) if silu else y

    variants = [("norm + cuBLAS" + (" + silu" if silu else ""),
                 lambda a, w: separate(a, w, F.linear)),
                ("norm + GEMV" + (" + silu" if silu else ""),
                 lambda a, w: separate(a, w, lambda b, v: gemv(b, v))),
                ("add_rms_norm_linear, one kernel", lambda a, w: norm_gemv(a, r, g, 1e-5, w,
                                                                           silu_and_mul=silu)[0])]
    want = variants[0][1](x, weights[0]).float()
    lines = []
    base = None
    for label, fn in variants:
        err = (fn(x, weights[0]).float() - want).abs().max().item()
        us = graph_us(fn, weights, x, replays)
        base = base or us
        tbps = bytes_ / (us * 1e-6) / 1e12
        lines.append(f"| {name} {n}x{k} | 1 | {label} (max diff {err:.2g}) | {us:.2f} | "
                     f"{tbps:.2f} | {tbps / copy:.0%} | {base / us:.2f}x |")
    del weights
    torch.cuda.empty_cache()
    print("\n".join(lines), flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in LLAMA_8B.values()])
    parser.add_argument("--block-n", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--block-k", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="rows of x (M); more than one takes the few-rows kernel")
    parser.add_argument("--rows-block-n", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--rows-block-k", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--norm", action="store_true",
                        help="also RMSNorm into qkv and into gate_up + SiLU, fused or not")
    parser.add_argument("--top", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_gemv_bench: needs a CUDA device", file=sys.stderr)
        return 1
    names = {f"{n}x{k}": name for name, (n, k) in LLAMA_8B.items()}
    copy = copy_tbps()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"copy {copy:.2f} TB/s", flush=True)
    lines = ["| shape | rows | kernel | us a call | TB/s | of copy | vs cuBLAS |",
             "|---|---|---|---|---|---|---|"]
    for rows in args.rows:
        for shape in args.shapes:
            n, k = (int(v) for v in shape.split("x"))
            lines += bench_shape(names.get(shape, shape), n, k, rows, configs(args, rows),
                                 args.replays, args.top, copy)
    if args.norm:
        for name, silu in (("qkv", False), ("gate_up", True)):
            lines += bench_norm(name, *LLAMA_8B[name], silu, args.replays, copy)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
