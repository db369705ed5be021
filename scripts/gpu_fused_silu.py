"""A SwiGLU MLP's gate|up GEMV with its SiLU fused (`linear_silu_and_mul`) against the two
kernels it replaces, on one GPU.

For each preset (dummy weights, bf16) the decode step as the engine replays it (CUDA graphs,
PDL as the daemon sets it) at B rows over `--context`-token contexts, every SwiGLUMLP's
activation either the fused op or the `linear` op then the `silu_and_mul` op (both Triton),
alternating over `--rounds` re-captures. `forward`: GPU time of one graph replay, from CUDA
events around 50 replays back to back. The fused epilogue computes what the two kernels
compute: every round's logits must equal the first unfused round's bit for bit, or the script
fails.

    python scripts/gpu_fused_silu.py [--presets llama-3.1-8b deepseek-v2-lite] [--batches 1 16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_models import step_bytes  # noqa: E402
from gpu_pdl import capture, forward_ms  # noqa: E402
from gpu_spec_verify import PAGE, WIDTH_ALIGN, plan_arrays  # noqa: E402
from kernel_bench.harness import measure_ceilings  # noqa: E402

import kernels  # noqa: E402
from appliance.engine.engine import to_forward_batch  # noqa: E402
from appliance.model import ModelRunner, ModelSource  # noqa: E402
from appliance.model.layers.mlp import SwiGLUMLP  # noqa: E402
from kernels.triton import pdl  # noqa: E402


def pdl_on() -> bool:
    """PDL as the daemon would set it on this GPU (TOKENSPEED_PDL, the GPU's generation)."""
    return pdl.pdl_enabled(torch.cuda.current_device())


def set_fused(runner: ModelRunner, fused: bool) -> int:
    """Every SwiGLUMLP's activation fused or as two ops; how many MLPs."""
    select = dict(device=runner.device, dtype=torch.bfloat16)
    one = kernels.select("linear_silu_and_mul", **select)
    linear, act = kernels.select("linear", **select), kernels.select("silu_and_mul", **select)
    mlps = [m for m in runner.model.modules() if isinstance(m, SwiGLUMLP)]
    for m in mlps:
        m.gate_up_act = one if fused else (lambda x, w, b: act(linear(x, w, b)))
    return len(mlps)


def measure(preset: str, batches: list[int], context: int, rounds: int, bw: float
            ) -> tuple[list[str], bool]:
    row_pages = -(-(context + 1) // PAGE)
    width = -(-row_pages // WIDTH_ALIGN) * WIDTH_ALIGN * PAGE
    runner = ModelRunner(ModelSource(preset=preset, load_format="dummy"), device="cuda",
                         dtype=torch.bfloat16, kv_num_pages=max(batches) * row_pages + 16,
                         page_size=PAGE)
    rng = np.random.default_rng(0)
    arrays = {b: plan_arrays(b, 0, context, runner.vocab_size, rng) for b in batches}
    fwd = {(b, f): [] for b in batches for f in (False, True)}
    logits: dict[tuple[int, bool], list[torch.Tensor]] = {}
    for r in range(rounds):
        for fused in (False, True):
            mlps = set_fused(runner, fused)
            capture(runner, pdl_on(), max(batches), width)
            print(f"== {preset} round {r}: {mlps} MLPs {'fused' if fused else 'two ops'}",
                  flush=True)
            for b in batches:
                batch = to_forward_batch(arrays[b], runner.device)
                logits.setdefault((b, fused), []).append(runner.forward(batch).float().cpu())
                fwd[(b, fused)].append(forward_ms(runner, batch))
    lines, equal = [], True
    for b in batches:
        ref = logits[(b, False)][0]
        same = all(torch.equal(ref, x) for f in (False, True) for x in logits[(b, f)])
        equal &= same
        two, one = (statistics.median(fwd[(b, f)]) for f in (False, True))
        bound_ms = step_bytes(preset, b, context) / bw * 1e3
        lines.append(f"| {preset} | {b} | {two * 1e3:.0f} | {one * 1e3:.0f} | {two / one:.3f}x "
                     f"| {bound_ms / two:.1%} -> {bound_ms / one:.1%} | "
                     f"{'yes' if same else 'NO'} |")
        print(lines[-1], flush=True)
    del runner
    torch.cuda.empty_cache()
    return lines, equal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["llama-3.1-8b", "deepseek-v2-lite"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bw = measure_ceilings().copy_gbs * 1e9
    print(f"{torch.cuda.get_device_name()}, copy {bw / 1e9:.0f} GB/s, PDL "
          f"{'on' if pdl_on() else 'off'}", flush=True)
    table = ["| preset | B | forward us, two ops | fused | speed-up | share of the bound | "
             "logits equal |", "|---|---|---|---|---|---|---|"]
    equal = True
    for preset in args.presets:
        lines, same = measure(preset, args.batches, args.context, args.rounds, bw)
        table += lines
        equal &= same
    print("\n".join(table))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
