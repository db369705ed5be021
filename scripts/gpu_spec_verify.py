"""The cost of a speculative verify step against a plain decode step, on one GPU.

For each preset (dummy weights, bf16) and batch size B (1..64 rows over 2K-token contexts):
the plain decode step as the engine runs it (CUDA-graph replay) and eagerly, then verify steps
with k = 1..8 drafts in every row (extend steps, logits at all 1 + k tokens of a row) as the
engine runs them (an extend-graph replay where the step fits one: the runner's graphs are
captured as the daemon captures them, for up to 256 rows and logits) and eagerly.
A step here is what the engine does between plan and commit: the plan's arrays to the device,
the forward, sampling (decode) or sampling at every token + acceptance (verify), the tokens
back to the host. Then, for per-draft acceptance rates alpha, the speed-up per user a verify
step gives: it emits (1 - alpha^(k+1)) / (1 - alpha) tokens on average, at cost ratio
t_verify(k) / t_decode(graph); the best k per batch size.

    python scripts/gpu_spec_verify.py                       # both presets, ~5 minutes on an H200
    python scripts/gpu_spec_verify.py --presets llama-3.1-8b --batches 1 8 --alpha 0.6 0.8
    python scripts/gpu_spec_verify.py --presets llama-3.1-8b --profile 1:1 1:4 16:4

--profile B:K runs torch.profiler over PROFILE_STEPS decode steps of B rows and as many verify
steps of k drafts a row (as the engine runs them), and prints where a verify step's extra time
goes: each step's wall time, its GPU kernel time, and the kernels whose per-step time differs
most between the two (OUT gets both kernel tables, kernels-decode-B<B>.csv / kernels-verify-...).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from appliance.engine.engine import to_forward_batch  # noqa: E402
from appliance.engine.plan_arrays import PlanArrays  # noqa: E402
from appliance.engine.protocol import GenerateRequest  # noqa: E402
from appliance.engine.step_timing import write_kernel_table  # noqa: E402
from appliance.engine.sampler import Sampler  # noqa: E402
from appliance.engine.verify import LogitLayout, Verifier  # noqa: E402
from appliance.model import ModelRunner, ModelSource  # noqa: E402
from appliance.model.extend_graph import graph_logits  # noqa: E402

PAGE = 16
WIDTH_ALIGN = 16  # the scheduler's page-table width alignment
GRAPH_ROWS = 256  # the daemon's graphs: min(scheduler.max_running, 256) rows
EXTEND_TOKENS = 2048  # ... and extend steps of up to scheduler.max_batch_tokens tokens
PROFILE_STEPS = 20


def plan_arrays(batch: int, drafts: int, context: int, vocab: int, rng) -> PlanArrays:
    """B rows over `context` cached tokens, each running 1 + drafts new tokens in its own pages."""
    per_row_pages = -(-(context + 1 + drafts) // PAGE)
    width = -(-per_row_pages // WIDTH_ALIGN) * WIDTH_ALIGN
    n = 1 + drafts
    pages = np.arange(batch * per_row_pages, dtype=np.int32).reshape(batch, per_row_pages)
    positions = np.tile(np.arange(context, context + n, dtype=np.int32), batch)
    rows = np.repeat(np.arange(batch), n)
    slots = pages[rows, positions // PAGE] * PAGE + positions % PAGE
    table = np.zeros((batch, width), np.int32)
    table[:, :per_row_pages] = pages
    return PlanArrays(
        step=0, num_decode=batch if drafts == 0 else 0,
        input_ids=rng.integers(0, vocab, batch * n).astype(np.int32), positions=positions,
        query_start=(np.arange(batch + 1) * n).astype(np.int32),
        prefix_lens=np.full(batch, context, np.int32),
        seq_lens=np.full(batch, context + n, np.int32), slot_mapping=slots.astype(np.int32),
        sample=np.ones(batch, np.int32), num_draft=np.full(batch, drafts, np.int32),
        page_table=table)


class Stepper:
    """One engine step (minus the scheduler) for a preset's runner."""

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.runner, self.device = runner, runner.device
        self.sampler = Sampler(self.device, runner.vocab_size)
        self.verifier = Verifier(self.device)
        self.params = {}
        for rid in range(max_batch):
            req = GenerateRequest(rid=rid, prompt_ids=[1], max_new_tokens=1, temperature=0.0)
            self.sampler.add(req, [])
            self.params[rid] = req

    def step(self, arrays: PlanArrays) -> None:
        """As Engine._forward + _sample + the copies its commit waits for."""
        rids = np.arange(arrays.num_rows)
        layout = LogitLayout.of(arrays) if arrays.has_drafts else None
        logits = self.runner.forward(to_forward_batch(
            arrays, self.device, None, layout.index if layout is not None else None))
        if layout is None:
            rows = self.sampler.prepare(rids, arrays, self.params)
        else:  # every logits row samples the token at its own position
            rows = self.sampler.prepare(rids, layout.per_logit_row(arrays), self.params,
                                        row_request=layout.row)
        tokens = self.sampler.sample(logits, rows).tokens
        if layout is not None:
            counts, tokens = self.verifier.accept(tokens, layout)
            counts.to("cpu", non_blocking=True)
        tokens.to("cpu", non_blocking=True)
        torch.cuda.synchronize(self.device)

    def time_ms(self, arrays: PlanArrays, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            self.step(arrays)
        times = []
        for _ in range(iters):
            started = time.perf_counter()
            self.step(arrays)
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)


def load(preset: str, max_batch: int, max_drafts: int, context: int
         ) -> tuple[ModelRunner, "Stepper"]:
    """The preset's runner with graphs captured as the daemon captures them, and a Stepper."""
    started = time.perf_counter()
    row_pages = -(-(context + 1 + max_drafts) // PAGE)
    pages = max_batch * row_pages + 16
    runner = ModelRunner(ModelSource(preset=preset, load_format="dummy"), device="cuda",
                         dtype=torch.bfloat16, kv_num_pages=pages, page_size=PAGE)
    # graphs as the daemon captures them (max_running 256, max_batch_tokens 2048), as wide as
    # the scheduler's aligned page tables
    runner.enable_cuda_graphs(GRAPH_ROWS, -(-row_pages // WIDTH_ALIGN) * WIDTH_ALIGN * PAGE,
                              max_extend_tokens=EXTEND_TOKENS,
                              max_logits=graph_logits(GRAPH_ROWS, max_drafts))
    print(f"== {preset}: loaded with {pages} KV pages, graphs captured in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return runner, Stepper(runner, max_batch)


def check_replay(runner: ModelRunner, batch, case: str, tolerance: float = 0.1,
                 min_agree: float = 0.9) -> None:
    """The verify step's logits from its extend graph against an eager forward: a broken
    replay differs by the logits' whole scale. bf16 over the whole model (the graph's rows
    take the extend kernel): DeepSeek-V2-Lite's 27 layers measured 4.3e-2 of the scale with
    every argmax equal (the 2-layer CUDA tests hold 2e-2)."""
    graphed = runner.forward(batch)
    extend, runner.extend_graphs = runner.extend_graphs, None
    try:
        eager = runner.forward(batch)
    finally:
        runner.extend_graphs = extend
    diff = float((graphed - eager).abs().max() / eager.abs().max().clamp_min(1e-6))
    same = float((graphed.argmax(-1) == eager.argmax(-1)).float().mean())
    print(f"   {case}: extend graph vs eager logits: max diff {diff:.2e} of their scale, "
          f"argmax agrees at {same:.0%} of tokens", flush=True)
    if diff > tolerance or same < min_agree:
        raise RuntimeError(f"{case}: the extend graph's logits differ from eager ones by "
                           f"{diff:.2e} of their scale (> {tolerance}) or agree on the argmax "
                           f"at {same:.0%} of tokens (< {min_agree:.0%})")


def measure(preset: str, batches: list[int], drafts: list[int], context: int, warmup: int,
            iters: int) -> dict:
    started = time.perf_counter()
    runner, stepper = load(preset, max(batches), max(drafts), context)
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        decode = plan_arrays(b, 0, context, runner.vocab_size, rng)
        if not runner.decode_graphs.can_run(to_forward_batch(decode, runner.device)):
            raise RuntimeError(f"B={b}: the decode step would not replay a CUDA graph")
        graph_ms = stepper.time_ms(decode, warmup, iters)
        graphs, runner.decode_graphs = runner.decode_graphs, None
        eager_ms = stepper.time_ms(decode, warmup, iters)
        runner.decode_graphs = graphs
        verify, verify_eager, replayed = {}, {}, {}
        for k in drafts:
            arrays = plan_arrays(b, k, context, runner.vocab_size, rng)
            layout = LogitLayout.of(arrays)
            batch = to_forward_batch(arrays, runner.device, None, layout.index)
            extend = runner.extend_graphs
            replayed[k] = runner.extend_bucket(batch) is not None
            if replayed[k] and k == drafts[0]:
                check_replay(runner, batch, f"B={b} k={k}")
            verify[k] = stepper.time_ms(arrays, warmup, iters)
            runner.extend_graphs = None
            verify_eager[k] = stepper.time_ms(arrays, warmup, iters)
            runner.extend_graphs = extend
        rows.append({"batch": b, "decode_graph_ms": graph_ms, "decode_eager_ms": eager_ms,
                     "verify_ms": verify, "verify_eager_ms": verify_eager,
                     "verify_replayed": replayed})
        cells = " ".join(f"k{k}={ms / graph_ms:.2f}x{'' if replayed[k] else '(eager)'}"
                         for k, ms in verify.items())
        print(f"B={b:3d} decode graph {graph_ms:7.2f} ms eager {eager_ms:7.2f} ms | verify / "
              f"graph decode: {cells}", flush=True)
    del stepper, runner
    torch.cuda.empty_cache()
    return {"preset": preset, "context": context, "rows": rows,
            "seconds": time.perf_counter() - started}


def profile_steps(stepper: Stepper, arrays: PlanArrays, path: Path
                  ) -> tuple[float, dict[str, tuple[float, float]]]:
    """torch.profiler over PROFILE_STEPS steps: the median wall ms a step, and each kernel's
    (calls, ms) a step; the kernel table (step_timing.write_kernel_table) to `path`."""
    for _ in range(3):
        stepper.step(arrays)
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_STEPS):
            started = time.perf_counter()
            stepper.step(arrays)
            walls.append((time.perf_counter() - started) * 1e3)
    write_kernel_table(prof, PROFILE_STEPS, True, path)
    with path.open() as f:
        kernels_ = {r["kernel"][:70]: (float(r["calls_per_step"]), float(r["ms_per_step"]))
                    for r in csv.DictReader(f)}
    return statistics.median(walls), kernels_


def profile(preset: str, cases: list[tuple[int, int]], context: int, out: Path) -> str:
    """Where a verify step's extra time goes, for each (B, k) in `cases`."""
    runner, stepper = load(preset, max(b for b, _ in cases), max(k for _, k in cases), context)
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for b, k in cases:
        steps = {}
        for name, drafts in (("decode", 0), ("verify", k)):
            arrays = plan_arrays(b, drafts, context, runner.vocab_size, rng)
            path = out / f"kernels-{name}-B{b}-k{drafts}.csv"
            steps[name] = profile_steps(stepper, arrays, path)
        (dw, dt), (vw, vt) = steps["decode"], steps["verify"]
        dk, vk = (sum(ms for _, ms in table.values()) for table in (dt, vt))
        lines += [f"### {preset} B={b} k={k}: step wall {dw:.2f} -> {vw:.2f} ms, GPU kernels "
                  f"{dk:.2f} -> {vk:.2f} ms a step (profiled, {PROFILE_STEPS} steps each)", "",
                  "| kernel | decode calls | decode ms | verify calls | verify ms | delta ms |",
                  "|---|---|---|---|---|---|"]
        names = sorted(set(dt) | set(vt),
                       key=lambda n: -abs(vt.get(n, (0, 0))[1] - dt.get(n, (0, 0))[1]))
        for name in names[:15]:
            (dc, dm), (vc, vm) = dt.get(name, (0, 0.0)), vt.get(name, (0, 0.0))
            lines.append(f"| {name} | {dc:g} | {dm:.4f} | {vc:g} | {vm:.4f} | {vm - dm:+.4f} |")
        lines.append("")
        print("\n".join(lines[-19:]), flush=True)
    del stepper, runner
    torch.cuda.empty_cache()
    return "\n".join(lines)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a verify row of k drafts emits when each draft survives with probability alpha
    (given the ones before it did): the accepted run plus one."""
    return float(sum(alpha ** i for i in range(k + 1)))


def tables(result: dict, alphas: list[float]) -> str:
    drafts = sorted({int(k) for row in result["rows"] for k in row["verify_ms"]})
    head = " | ".join(f"k={k}" for k in drafts)
    lines = [f"### {result['preset']} (bf16, dummy weights, {result['context']}-token contexts)",
             "", "Step time in ms (verify / decode-graph ratio); verify as the engine runs it: "
             "an extend-graph replay, or eager where marked *", "",
             f"| B | decode graph | decode eager | {head} |",
             "|---|---|---|" + "---|" * len(drafts)]
    for row in result["rows"]:
        g = row["decode_graph_ms"]
        cells = " | ".join(f"{row['verify_ms'][k]:.2f} ({row['verify_ms'][k] / g:.2f}x)"
                           f"{'' if row['verify_replayed'][k] else '*'}" for k in drafts)
        lines.append(f"| {row['batch']} | {g:.2f} | {row['decode_eager_ms']:.2f} | {cells} |")
    lines += ["", "Verify steps run eagerly (ms; what the graphs save)", "",
              f"| B | {head} |", "|---|" + "---|" * len(drafts)]
    for row in result["rows"]:
        cells = " | ".join(f"{row['verify_eager_ms'][k]:.2f} "
                           f"({row['verify_eager_ms'][k] - row['verify_ms'][k]:+.2f})"
                           for k in drafts)
        lines.append(f"| {row['batch']} | {cells} |")
    lines += ["", "Per-user speed-up over graph decode at the best k (E[tokens] / cost ratio)", "",
              "| B | " + " | ".join(f"alpha={a}" for a in alphas) + " |",
              "|---|" + "---|" * len(alphas)]
    for row in result["rows"]:
        g = row["decode_graph_ms"]
        cells = []
        for a in alphas:
            gain, k = max((expected_tokens(a, k) * g / row["verify_ms"][k], k) for k in drafts)
            cells.append(f"{gain:.2f}x (k={k})" if gain > 1 else f"{gain:.2f}x (off)")
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["llama-3.1-8b", "deepseek-v2-lite"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--drafts", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--out", default=os.environ.get("OUT", ""))
    parser.add_argument("--override", nargs="+", metavar="OP=BACKEND", default=[],
                        help="kernel backends to use (kernels.set_overrides), e.g. linear=torch")
    parser.add_argument("--profile", nargs="+", metavar="B:K", default=[],
                        help="profile decode against verify steps at these batch sizes and drafts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_spec_verify: needs a CUDA device", file=sys.stderr)
        return 1
    overrides = dict(item.split("=", 1) for item in args.override)
    kernels.set_overrides(overrides)
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"kernel overrides {overrides or 'none'}", flush=True)
    if args.profile:
        cases = [tuple(int(v) for v in case.split(":")) for case in args.profile]
        report = "\n\n".join(profile(p, cases, args.context, Path(args.out or "/tmp/out"))
                              for p in args.presets)
        print("\n" + report)
        Path(args.out or "/tmp/out", "spec_profile.md").write_text(report + "\n")
        return 0
    results = [measure(p, args.batches, args.drafts, args.context, args.warmup, args.iters)
               for p in args.presets]
    report = "\n\n".join(tables(r, args.alpha) for r in results)
    print("\n" + report)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "spec_verify.md").write_text(report + "\n")
        Path(args.out, "spec_verify.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
