"""CPU cost of a verify step against a decode step, the reference attention against the CPU
backend's (kernels/cpu/paged_attention.py): the default model (SmolLM2-135M), B rows over
CTX-token contexts, each row verifying K drafts (or half the rows), model forward only,
median of ROUNDS after a warm-up that also settles the tuned linear's choices.

    .venv/bin/python scripts/bench_cpu_verify.py [--rows 8] [--ctx 1500] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import kernels
from appliance.model import ForwardBatch, ModelRunner
from appliance.model.presets import packaged_weights

PS = 16


def step(rows: int, ctx: int, drafts: int, num_decode: int) -> ForwardBatch:
    """rows over ctx cached tokens each; rows past num_decode verify `drafts` drafts."""
    ids, pos, qs, slots = [], [], [0], []
    for b in range(rows):
        for j in range(1 + (drafts if b >= num_decode else 0)):
            p = ctx + j
            ids.append(5)
            pos.append(p)
            slots.append((b * 256 + p // PS) * PS + p % PS)
        qs.append(len(ids))
    n = torch.tensor(qs[1:]) - torch.tensor(qs[:-1])
    i32 = dict(dtype=torch.int32)
    return ForwardBatch(
        torch.tensor(ids, **i32), torch.tensor(pos, **i32), torch.tensor(qs, **i32),
        torch.full((rows,), ctx, **i32), (ctx + n).to(torch.int32),
        torch.tensor([list(range(b * 256, b * 256 + 256)) for b in range(rows)], **i32),
        torch.tensor(slots, **i32), num_decode,
        logit_index=None if drafts == 0 else torch.arange(len(ids), **i32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(2)
    weights = str(packaged_weights("smollm2-135m-instruct"))
    cases = {"decode": (0, a.rows), "verify 2 drafts": (2, 0), "verify 4 drafts": (4, 0),
             "half verify 2": (2, a.rows // 2)}
    runners = {}
    for name, over in (("reference", {"decode_attention": "torch", "extend_attention": "torch"}),
                       ("cpu", {})):
        kernels.set_overrides(over)
        runners[name] = ModelRunner(weights, kv_num_pages=256 * a.rows, page_size=PS)
        for drafts, nd in cases.values():      # warm-up: kernels chosen, linear tuned
            for _ in range(16):
                runners[name].forward(step(a.rows, a.ctx, drafts, nd))
    kernels.set_overrides({})
    print(f"{a.rows} rows over {a.ctx}-token contexts, ms per forward (median of {a.rounds})")
    print(f"{'step':>16} {'tokens':>7} {'reference':>10} {'cpu':>8}")
    for case, (drafts, nd) in cases.items():
        times = {}
        for name, runner in runners.items():
            samples = []
            for _ in range(a.rounds):
                batch = step(a.rows, a.ctx, drafts, nd)
                started = time.perf_counter()
                runner.forward(batch)
                samples.append(time.perf_counter() - started)
            times[name] = 1e3 * statistics.median(samples)
        tokens = step(a.rows, a.ctx, drafts, nd).num_tokens
        print(f"{case:>16} {tokens:>7} {times['reference']:>10.1f} {times['cpu']:>8.1f}")


if __name__ == "__main__":
    main()
