"""Programmatic dependent launch on against off (kernels/triton/pdl.py), on one GPU.

For each preset (dummy weights, bf16) the decode step as the engine replays it (CUDA graphs
captured as the daemon captures them) at B rows over `--context`-token contexts, with PDL off
and on, alternating over `--rounds` re-captures so drift hits both alike:
- `forward`: GPU time of one graph replay of the forward, from CUDA events around 50
  replays back to back (what bounds the engine, whose host work overlaps the GPU);
- `step`: one step as the engine runs it (plan arrays in, forward, sampling, tokens out,
  synchronized; gpu_spec_verify.Stepper), the median wall time;
- the bound: the copy bandwidth measured in the same run over the bytes a decode step reads
  (gpu_models.step_bytes: the weights B tokens touch plus the KV cache at the context).
PDL changes when kernels start, never what they compute: each round's logits with PDL must equal
the first round's without it bit for bit (as the rounds without it equal each other: the
control), or the script fails.

    python scripts/gpu_pdl.py                                    # both presets, B = 1, 16, 64
    python scripts/gpu_pdl.py --presets llama-3.1-8b --batches 1 --context 512
    python scripts/gpu_pdl.py --profile 1 --rounds 1     # + where a B=1 replay's GPU time goes

--profile B: torch.profiler over PROFILE_REPLAYS graph replays of B rows, PDL off and on: the
kernels' time a step (with PDL a kernel's time includes its wait for the one before), their
sum against the replay's time, and the top kernels; the tables go to OUT (kernels-*.csv).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_models import step_bytes  # noqa: E402
from gpu_spec_verify import PAGE, WIDTH_ALIGN, Stepper, plan_arrays  # noqa: E402
from kernel_bench.harness import measure_ceilings  # noqa: E402

from appliance.engine.engine import to_forward_batch  # noqa: E402
from appliance.engine.step_timing import write_kernel_table  # noqa: E402
from appliance.model import ModelRunner, ModelSource  # noqa: E402
from kernels.triton import pdl  # noqa: E402

REPLAYS = 50
PROFILE_REPLAYS = 20
TOP = 14


def set_pdl(on: bool) -> None:
    os.environ[pdl.ENV] = "1" if on else "0"
    pdl.pdl_enabled.cache_clear()


def capture(runner: ModelRunner, on: bool, rows: int, width: int) -> None:
    """The decode graphs (up to `rows` rows, `width`-token tables) re-captured with PDL `on`."""
    set_pdl(on)
    runner.decode_graphs = None
    torch.cuda.empty_cache()
    runner.enable_cuda_graphs(rows, width)


def forward_ms(runner: ModelRunner, batch) -> float:
    """GPU ms of one forward: REPLAYS back to back between two events."""
    runner.forward(batch)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        runner.forward(batch)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / REPLAYS


def profile(runner: ModelRunner, batch, name: str, out: Path) -> str:
    """Kernels of PROFILE_REPLAYS replays of `batch` (module doc), as table lines."""
    forward = forward_ms(runner, batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_REPLAYS):
            runner.forward(batch)
        torch.cuda.synchronize()
    path = out / f"kernels-{name}.csv"
    write_kernel_table(prof, PROFILE_REPLAYS, True, path)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    total = sum(float(r["ms_per_step"]) for r in rows)
    lines = [f"### {name}: replay {forward * 1e3:.0f} us, kernels {total * 1e3:.0f} us a step "
             f"({sum(float(r['calls_per_step']) for r in rows):.0f} launches)", "",
             "| kernel | calls | us a step | % |", "|---|---|---|---|"]
    lines += [f"| {r['kernel'][:72]} | {float(r['calls_per_step']):g} | "
              f"{float(r['ms_per_step']) * 1e3:.1f} | {r['pct']} |" for r in rows[:TOP]]
    return "\n".join(lines)


def card_bandwidth(tool: str) -> float | None:
    """The copy bandwidth (bytes/s) of this run's GPU, after a line naming the card; None
    (and a message) without one."""
    if not torch.cuda.is_available():
        print(f"{tool}: needs a CUDA device", file=sys.stderr)
        return None
    bw = measure_ceilings().copy_gbs * 1e9
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  copy "
          f"{bw / 1e9:.0f} GB/s", flush=True)
    return bw


def measure(preset: str, batches: list[int], context: int, rounds: int, bw: float,
            profile_rows: int | None, out: Path) -> tuple[list[str], list[str], list[str]]:
    row_pages = -(-(context + 1) // PAGE)
    width = -(-row_pages // WIDTH_ALIGN) * WIDTH_ALIGN * PAGE     # as the scheduler aligns it
    runner = ModelRunner(ModelSource(preset=preset, load_format="dummy"), device="cuda",
                         dtype=torch.bfloat16, kv_num_pages=max(batches) * row_pages + 16,
                         page_size=PAGE)
    stepper = Stepper(runner, max(batches))
    rng = np.random.default_rng(0)
    arrays = {b: plan_arrays(b, 0, context, runner.vocab_size, rng) for b in batches}
    fwd = {(b, on): [] for b in batches for on in (False, True)}
    wall = {(b, on): [] for b in batches for on in (False, True)}
    logits = {}
    for r in range(rounds):
        for on in (False, True):
            started = time.perf_counter()
            capture(runner, on, max(batches), width)
            print(f"== {preset} round {r} PDL {'on' if on else 'off'}: graphs captured in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
            for b in batches:
                batch = to_forward_batch(arrays[b], runner.device)
                if not runner.decode_graphs.can_run(batch):
                    raise RuntimeError(f"B={b}: the decode step would not replay a graph")
                logits.setdefault((b, on), []).append(runner.forward(batch).float().cpu())
                fwd[(b, on)].append(forward_ms(runner, batch))
                wall[(b, on)].append(stepper.time_ms(arrays[b], 3, 20))
    lines, differ = [], []
    for b in batches:
        ref = logits[(b, False)][0]
        control = all(torch.equal(ref, x) for x in logits[(b, False)])
        same = all(torch.equal(ref, x) for x in logits[(b, True)])
        diff = max(float((ref - x).abs().max()) for x in logits[(b, True)])
        bound_ms = step_bytes(preset, b, context) / bw * 1e3
        off, on = (statistics.median(fwd[(b, x)]) for x in (False, True))
        w_off, w_on = (statistics.median(wall[(b, x)]) for x in (False, True))
        lines.append(f"| {preset} | {b} | {off * 1e3:.0f} | {on * 1e3:.0f} | {off / on:.3f}x | "
                     f"{bound_ms / off:.1%} -> {bound_ms / on:.1%} | {w_off * 1e3:.0f} | "
                     f"{w_on * 1e3:.0f} | {b / w_on * 1e3:.1f} | "
                     f"{'yes' if same else f'NO (max diff {diff:.3g})'}"
                     f"{'' if control else ' (control differs too)'} |")
        print(lines[-1], flush=True)
        if not same:
            differ.append(f"{preset} B={b}")
    profiles = []
    if profile_rows is not None:
        batch = to_forward_batch(plan_arrays(profile_rows, 0, context, runner.vocab_size, rng),
                                 runner.device)
        for on in (False, True):
            capture(runner, on, max(batches), width)
            profiles.append(profile(runner, batch, f"{preset}-B{profile_rows}-pdl-"
                                    f"{'on' if on else 'off'}", out))
            print(profiles[-1], flush=True)
    del stepper, runner
    torch.cuda.empty_cache()
    return lines, differ, profiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["llama-3.1-8b", "deepseek-v2-lite"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", type=int, metavar="B", default=None)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()
    bw = card_bandwidth("gpu_pdl")
    if bw is None:
        return 1
    head = ["| preset | B | forward us, PDL off | on | speed-up | share of the bound | "
            "step us, off | on | tok/s on | logits equal |", "|---" * 10 + "|"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, differ, profiles = [], [], []
    for preset in args.presets:
        lines, bad, tables = measure(preset, args.batches, args.context, args.rounds, bw,
                                     args.profile, out)
        rows, differ, profiles = rows + lines, differ + bad, profiles + tables
    if profiles:
        print("\n" + "\n\n".join(profiles))
    print(f"\ncontext {args.context} tokens; forward: CUDA-graph replay; step: as the engine")
    print("\n".join(head + rows))
    if differ:
        print(f"logits with PDL differ from those without: {', '.join(differ)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
