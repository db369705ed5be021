#!/usr/bin/env python3
"""Host time of the engine's step loop (plan -> forward -> sample -> commit) with a model that
costs nothing, so that what the loop itself adds is what is measured.

B requests decode at once; one of them may ask for a feature (`--mode`):
  plain      nobody asks for anything (the path every batch without the features takes)
  greedy     every row at temperature 0 (what `suffix` is to be compared with)
  penalties  one row with repetition / presence / frequency penalties
  bias       one row with a logit_bias and min_tokens
  logprobs   one row with logprobs=5
  json       one row under a JSON schema (llguidance; the step commits before its sampler)
  suffix     every row drafts (speculative.method suffix; each row repeats one token, so its
             drafts are all accepted): host ms of a verify step, and tokens a step emits
  model-defaults  every row with Qwen3-Coder's generation_config.json sampling (temperature 0.7,
             top_p 0.8, top_k 20, repetition_penalty 1.05: what a request that sends none gets)
  suffix-penalized  suffix with every row greedy under that repetition penalty (each verify row
             counts the drafts before it)
Prints the median and mean per step (the median is the one to compare on a shared machine). On CPU the `sample` reference dominates a large vocabulary,
so the default vocabulary is small; on a GPU pass --device cuda to time the launches.

    .venv/bin/python scripts/bench_engine_step.py [--batch 64] [--vocab 1024] [--steps 300]
        [--mode plain penalties bias logprobs json] [--device cpu | cuda [--check-syncs]]
        [--override apply_penalties=torch ...]   # kernels.override: another backend of an op
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.config import load_config  # noqa: E402
from appliance.engine.engine import Engine  # noqa: E402
from appliance.engine.plan_arrays import PlanChannel  # noqa: E402
from appliance.engine.protocol import GenerateRequest  # noqa: E402

SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 100_000}},
          "required": ["text"]}  # does not end within the benchmark
FEATURES = {
    "plain": {},
    "greedy": {"temperature": 0.0},
    "penalties": {"repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.3},
    "bias": {"logit_bias": {5: 3.0, 7: -3.0}, "min_tokens": 10_000},
    "logprobs": {"logprobs": 5},
    "json": {"constraint": "json"},
    "suffix": {"temperature": 0.0},  # greedy: a row's fixed logits repeat its token
    "model-defaults": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    "suffix-penalized": {"temperature": 0.0, "repetition_penalty": 1.05},
}
# the modes every row asks for (the others: row 0 alone)
EVERY_ROW = {"greedy", "suffix", "model-defaults", "suffix-penalized"}
MODE_CONFIG = {"suffix": ("speculative.method=suffix",),
               "suffix-penalized": ("speculative.method=suffix",)}


class FreeRunner:
    """Random logits that cost one slice: the model's time is not what is measured."""

    num_pages, page_size, max_model_len = 8192, 16, 1 << 16
    eos_token_ids = (2,)

    def __init__(self, batch: int, vocab: int, device: torch.device) -> None:
        self.device = device
        self.vocab_size = vocab
        self.logits = torch.randn(batch, vocab, device=device)

    def forward(self, batch) -> torch.Tensor:
        if batch.logit_index is None:
            return self.logits[:batch.num_rows].clone()
        # a verify step: every logits row gets its request row's logits
        rows = torch.searchsorted(batch.query_start[1:], batch.logit_token_index, right=True)
        return self.logits[rows]


def tiny_tokenizer() -> str:
    from appliance.config import cache_dir
    from appliance.model.tiny import ensure_tiny_checkpoint

    return str(ensure_tiny_checkpoint(cache_dir() / "models" / "tiny-llama"))


def make_engine(runner, with_tokenizer: bool, overrides: tuple[str, ...] = ()) -> Engine:
    from appliance.engine.channel import FrontendChannel

    frontend = FrontendChannel(Path(tempfile.mkdtemp(prefix="ts-bench-")))
    args = (load_config(None, [f"device={runner.device.type}", *overrides]), runner,
            PlanChannel(None), frontend.endpoints)
    engine = Engine(*args, tokenizer=tiny_tokenizer()) if with_tokenizer else Engine(*args)
    engine._send = lambda message: None
    engine.frontend = frontend  # kept alive with the engine
    return engine


def request(rid: int, mode: str, max_new_tokens: int) -> GenerateRequest:
    fields = dict(FEATURES[mode]) if rid == 0 or mode in EVERY_ROW else {}
    if fields.pop("constraint", None):
        from appliance.engine.protocol import Constraint

        fields["constraint"] = Constraint("json_schema", json.dumps(SCHEMA))
        fields["temperature"] = 1.0
    return GenerateRequest(rid, prompt_ids=[3, 4, 5, 6], max_new_tokens=max_new_tokens,
                           ignore_eos=mode != "json" or rid != 0, **fields)


def fail_on_host_sync(engine: Engine) -> None:
    """CUDA: any host sync inside the sampler (processors, mask, logprobs) raises."""
    sample = engine.sampler.sample

    def checked(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return sample(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine.sampler.sample = checked


def bench(mode: str, batch: int, vocab: int, steps: int, device: torch.device,
          check_syncs: bool = False) -> tuple[list[float], float]:
    """Seconds of each step after the warm-up, and tokens generated per step."""
    engine = make_engine(FreeRunner(batch, vocab, device), mode == "json",
                         MODE_CONFIG.get(mode, ()))
    if check_syncs:
        fail_on_host_sync(engine)
    for rid in range(batch):
        # enough for every step to emit a whole verify row (1 + max_draft tokens)
        per_step = 1 + engine.config.speculative.max_draft
        engine._submit(request(rid, mode, (steps + 30) * per_step))
    while getattr(engine, "compiling", None):
        engine._admit_compiled()
        time.sleep(0.001)
    times = []
    for i in range(steps + 30):
        if i == 30:
            generated = engine.scheduler.stats()["generation_tokens_total"]
        t0 = time.perf_counter()
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 30:
            times.append(time.perf_counter() - t0)
    assert len(engine.requests) == batch, f"{mode}: a request ended during the benchmark"
    return times, (engine.scheduler.stats()["generation_tokens_total"] - generated) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mode", nargs="+", default=list(FEATURES), choices=list(FEATURES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check-syncs", action="store_true",
                        help="CUDA: fail if the sampler syncs with the host (torch sync debug mode)")
    parser.add_argument("--override", nargs="*", default=[], metavar="OP=BACKEND",
                        help="kernel backends to force (as kernels.override.<op> in the config)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import kernels
    kernels.set_overrides(dict(item.split("=", 1) for item in args.override))
    if "tokenizer" not in inspect.signature(Engine).parameters:  # an engine without the features
        args.mode = ["plain"]
    print(f"batch {args.batch}, vocab {args.vocab}, {args.steps} steps, device {args.device}"
          + (f", overrides {' '.join(args.override)}" if args.override else ""))
    for mode in args.mode:
        times, tokens = bench(mode, args.batch, args.vocab, args.steps,
                              torch.device(args.device), args.check_syncs)
        print(f"{mode:10s} median {statistics.median(times) * 1e3:7.3f} ms   "
              f"mean {statistics.fmean(times) * 1e3:7.3f} ms   {tokens:6.1f} tokens a step")


if __name__ == "__main__":
    main()
