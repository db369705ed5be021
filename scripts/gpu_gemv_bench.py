"""Batch-1 linear layers on one GPU: cuBLAS (F.linear) against kernels/triton/gemv.py.

For each weight shape of a preset's decode step (default: Llama-3.1-8B's qkv, o, gate_up,
down and lm_head), a CUDA graph calls the op on enough distinct weight copies that every call
reads its weight from HBM, as a decode step does; replayed, timed with CUDA events. Prints,
per shape, cuBLAS, the GEMV as `gemv_config` tiles it (the rule) and the best few GEMV
configurations: microseconds a call and the weight bytes a second, against the copy bandwidth
measured in the same run (a device-to-device copy of 1 GiB). Checks every configuration
against F.linear first.

    python scripts/gpu_gemv_bench.py                 # ~2 minutes on an H200
    python scripts/gpu_gemv_bench.py --shapes 4096x4096 --top 5
    python scripts/gpu_gemv_bench.py --shapes ds --block-n 2 4 8 16 --block-k 256 512 1024 2048
    python scripts/gpu_gemv_bench.py --fold         # the norms' consumers, norm folded or not

--fold: for the weights a pre-norm feeds (default: the 8B's qkv and gate_up, DeepSeek-V2-Lite's
q|kv_a and dense gate_up; a gate_up with its SiLU epilogue), the norm kernel then the GEMV
(what runs unfolded: the baseline, in place of cuBLAS) against the GEMV with the norm and its
residual add in its loads (`rms_norm_linear`), as `gemv_config(n, k, norm=True)` tiles it and
in every configuration swept (default rows 16, 32, 64: each program re-reads the row, residual
and norm weight, so fewer programs read less).
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

from kernel_bench.harness import sequence_us  # noqa: E402
from kernels.triton.elementwise import fused_add_rms_norm  # noqa: E402
from kernels.triton.gemv import GemvConfig, RowNorm, gemv, gemv_config  # noqa: E402

LLAMA_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
            "down": (4096, 14336), "lm_head": (128256, 4096)}
# DeepSeek-V2-Lite's: q_proj, kv_a_proj_with_mqa, o_proj, the shared experts' gate_up and down,
# the dense first layer's gate_up and down (--shapes ds)
DEEPSEEK_V2_LITE = {"ds q": (3072, 2048), "ds kv_a": (576, 2048), "ds o": (2048, 2048),
                    "ds shared gate_up": (5632, 2048), "ds shared down": (2048, 2816),
                    "ds dense gate_up": (21888, 2048), "ds dense down": (2048, 10944)}
# --fold's shapes: the consumers of a pre-norm (gate_up ones take the SiLU epilogue)
FOLDED = {"qkv": (6144, 4096), "gate_up": (28672, 4096), "ds q|kv_a": (3648, 2048),
          "ds dense gate_up": (21888, 2048)}
EPS = 1e-5
STREAM_BYTES = 1 << 30  # weight copies per graph: at least this much, well past the L2


def graph_us(fn, weights: list[torch.Tensor], x: torch.Tensor, replays: int) -> float:
    """Microseconds a call, fn(x, w) over every w in a CUDA graph, replayed."""
    return sequence_us([lambda w=w: fn(x, w) for w in weights], replays)


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


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    """Enough [n, k] bf16 weights that a graph calling the op on each reads them from HBM."""
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            for _ in range(max(2, -(-STREAM_BYTES // (n * k * 2))))]


def table_lines(shape: str, results: list[tuple[str, float]], bytes_: int, top: int,
                copy: float) -> list[str]:
    """Markdown rows: the baseline and the rule (results' first two), then the `top` fastest of
    the rest; us a call, the weight's TB/s, of copy, speed-up over the baseline."""
    base = results[0][1]
    lines = []
    for label, us in results[:2] + sorted(results[2:], key=lambda r: r[1])[:top]:
        tbps = bytes_ / (us * 1e-6) / 1e12
        lines.append(f"| {shape} | {label} | {us:.2f} | {tbps:.2f} | {tbps / copy:.0%} | "
                     f"{base / us:.2f}x |")
    return lines


def timed_configs(name: str, cfgs: list, run, label, weights: list[torch.Tensor],
                  x: torch.Tensor, want: torch.Tensor, replays: int) -> list[tuple[str, float]]:
    """(label(cfg), us a call) for each configuration whose run(x, w, cfg) gives `want` within
    2% of its largest value; one whose buffers exceed the shared memory is left out."""
    timed = []
    for cfg in cfgs:
        try:
            got = run(x, weights[0], cfg)
        except OutOfResources:
            continue
        err = (got.float() - want).abs().max().item()
        if err > 0.02 * want.abs().max().item() + 1e-3:
            print(f"{name} {label(cfg)}: WRONG, max error {err:.4g}", flush=True)
            continue
        timed.append((label(cfg), graph_us(lambda a, w, c=cfg: run(a, w, c), weights, x, replays)))
    return timed


def configs(args) -> list[GemvConfig]:
    return [GemvConfig(n, k, w, s) for n, k, w, s in itertools.product(
        args.block_n, args.block_k, args.warps, args.stages)]


def _label(cfg: GemvConfig) -> str:
    return f"{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def bench_shape(name: str, n: int, k: int, cfgs: list[GemvConfig], replays: int, top: int,
                copy: float, fold: bool = False) -> list[str]:
    weights = weight_copies(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    silu = fold and "gate_up" in name
    if fold:   # the row is x + residual, normed; the baseline runs the norm kernel first
        residual, norm_w = torch.randn_like(x), torch.rand(k, device="cuda", dtype=x.dtype) + 0.5
        residual_out = torch.empty_like(x)
        row_norm = RowNorm(norm_w, EPS, residual, residual_out)

        def base(a, w):
            return gemv(fused_add_rms_norm(a, residual, norm_w, EPS)[0], w, silu_mul=silu)

        def run(a, w, c=None):
            return gemv(a, w, None, c, silu, row_norm)
        base_label, rule = "norm, then GEMV", gemv_config(n, k, norm=True)
    else:
        def base(a, w):
            return F.linear(a, w)

        def run(a, w, c=None):
            return gemv(a, w, None, c)
        base_label, rule = "cuBLAS", gemv_config(n, k)
    want = base(x, weights[0]).float()
    results = [(base_label, graph_us(base, weights, x, replays)),
               (f"rule {_label(rule)}", graph_us(run, weights, x, replays))]
    results += timed_configs(name, cfgs, run, lambda c: f"gemv {_label(c)}", weights, x, want,
                             replays)
    lines = table_lines(f"{name} {n}x{k}", results, n * k * 2, top, copy)
    del weights
    torch.cuda.empty_cache()
    print("\n".join(lines), flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="NxK ... or ds (default: the 8B's; with --fold, FOLDED's)")
    parser.add_argument("--fold", action="store_true",
                        help="the norm folded into the GEMV against the norm kernel then it")
    parser.add_argument("--block-n", type=int, nargs="+", default=None,
                        help="default 4 8 16; with --fold 16 32 64")
    parser.add_argument("--block-k", type=int, nargs="+", default=None,
                        help="default 256 512 1024; with --fold 128 256 512")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=None,
                        help="default 2 4; with --fold 2 (a sweep of 18 tiles, ~2 minutes)")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--top", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_gemv_bench: needs a CUDA device", file=sys.stderr)
        return 1
    shapes = FOLDED if args.fold else LLAMA_8B
    args.shapes = args.shapes or [f"{n}x{k}" for n, k in shapes.values()]
    args.block_n = args.block_n or ([16, 32, 64] if args.fold else [4, 8, 16])
    args.block_k = args.block_k or ([128, 256, 512] if args.fold else [256, 512, 1024])
    args.stages = args.stages or ([2] if args.fold else [2, 4])
    names = {f"{n}x{k}": name for name, (n, k) in {**LLAMA_8B, **DEEPSEEK_V2_LITE, **shapes}.items()}
    deepseek = [f"{n}x{k}" for n, k in DEEPSEEK_V2_LITE.values()]
    args.shapes = [s for shape in args.shapes for s in (deepseek if shape == "ds" else [shape])]
    copy = copy_tbps()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"copy {copy:.2f} TB/s", flush=True)
    lines = [f"| shape | kernel | us a call | TB/s | of copy | vs {'unfolded' if args.fold else 'cuBLAS'} |",
             "|---|---|---|---|---|---|"]
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        lines += bench_shape(names.get(shape, shape), n, k, configs(args), args.replays,
                             args.top, copy, args.fold)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
