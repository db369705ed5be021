"""What MTP drafts cost per step, on one GPU: the MTP pass against a plain decode step.

DeepSeek-V2-Lite's shape with dummy weights (bf16) and one next-token layer
(`num_nextn_predict_layers: 1`: an MLA + MoE decoder layer, enorm/hnorm/eh_proj); dummy weights
accept ~no draft, so only costs are measured. For each batch size B (rows over 2K-token
contexts), the step as the engine runs it between plan and commit (gpu_spec_verify.Stepper):
a plain decode step (CUDA graph, logits only, what runs with speculation off); the same step
capturing every token's hidden state too (what runs with `speculative.method: mtp`); and that
step followed by the MTP pass (speculative/mtp.py: the next-token layer over the step's tokens,
then k - 1 chained draft steps) for k = 1, 2, 4. The table, last, gives each in ms and the MTP
step's cost relative to the plain decode step: the draft acceptance at which MTP pays is
where the emitted tokens per verify step beat that ratio times the verify step's own cost
(gpu_spec_verify.py measures that).

    python scripts/gpu_mtp_cost.py                          # ~3 minutes on an H200
    python scripts/gpu_mtp_cost.py --batches 1 8 --drafts 1 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from appliance.engine.engine import to_forward_batch  # noqa: E402
from appliance.engine.plan_arrays import PlanArrays  # noqa: E402
from appliance.engine.speculative.mtp import MTPDraft, NextTokenPass  # noqa: E402
from appliance.model import ModelRunner, ModelSource  # noqa: E402
from gpu_spec_verify import PAGE, WIDTH_ALIGN, Stepper, plan_arrays  # noqa: E402


class MTPStepper(Stepper):
    """A decode step with the hidden states, then the MTP pass of `depth` drafts."""

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        super().__init__(runner, max_batch)
        self.next_token = NextTokenPass(runner)
        self.source = MTPDraft()
        self.depth = 0  # 0: no MTP pass (the hidden-state step alone)

    def step(self, arrays: PlanArrays) -> None:
        rids = np.arange(arrays.num_rows)
        batch = to_forward_batch(arrays, self.device)
        logits, hidden = self.runner.forward_hidden(batch)
        tokens = self.sampler.sample(logits, self.sampler.prepare(rids, arrays, self.params)).tokens
        if self.depth:
            following = self.source.following(rids, arrays, None)
            chains = self.next_token.launch(batch, hidden, arrays, following, tokens, None,
                                            self.depth)
            chains.to("cpu", non_blocking=True)
        tokens.to("cpu", non_blocking=True)
        torch.cuda.synchronize(self.device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="deepseek-v2-lite")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--drafts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", ""))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_mtp_cost: needs a CUDA device", file=sys.stderr)
        return 1
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    max_batch = max(args.batches)
    row_pages = -(-(args.context + 1) // PAGE)
    source = ModelSource(preset=args.preset, load_format="dummy",
                         hf_overrides={"num_nextn_predict_layers": 1})
    runner = ModelRunner(source, device="cuda", dtype=torch.bfloat16,
                         kv_num_pages=max_batch * row_pages + 16, page_size=PAGE)
    max_len = -(-row_pages // WIDTH_ALIGN) * WIDTH_ALIGN * PAGE
    rng = np.random.default_rng(0)
    plans = {b: plan_arrays(b, 0, args.context, runner.vocab_size, rng) for b in args.batches}
    runner.enable_cuda_graphs(max_batch, max_len)                 # logits only: MTP off
    plain = Stepper(runner, max_batch)
    decode = {b: plain.time_ms(plans[b], args.warmup, args.iters) for b in args.batches}
    runner.enable_cuda_graphs(max_batch, max_len, hidden=True)    # what MTP runs
    mtp = MTPStepper(runner, max_batch)
    hidden = {b: mtp.time_ms(plans[b], args.warmup, args.iters) for b in args.batches}
    passes = {}
    for k in args.drafts:
        mtp.depth = k
        passes[k] = {b: mtp.time_ms(plans[b], args.warmup, args.iters) for b in args.batches}
    print(f"{args.preset} + 1 MTP layer, dummy bf16 weights, {args.context}-token contexts, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    head = ("| B | decode, MTP off (graph) ms | decode + hidden states ms | "
            + " | ".join(f"+ MTP pass k={k} ms (x decode)" for k in args.drafts) + " |")
    lines = [head, "|" + "---|" * (3 + len(args.drafts))]
    for b in args.batches:
        cells = [f"{passes[k][b]:.2f} ({passes[k][b] / decode[b]:.2f}x)" for k in args.drafts]
        lines.append(f"| {b} | {decode[b]:.2f} | {hidden[b]:.2f} ({hidden[b] / decode[b]:.2f}x)"
                     f" | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "mtp_cost.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
