#!/usr/bin/env python3
"""Host time of the speculation policy's per-step decision (`DraftPolicy.lengths`): B decoding
requests with acceptance evidence (a third accept every draft, the rest 7 of 8), k = 8, steps
replaying CUDA graphs whose extend graphs hold 512 logits rows (so from 64 rows on the drafts
are cut to fit). The engine pays it on every step in which anyone may draft, with nothing in
flight on the GPU (a verify step is planned after the previous commit).

    .venv/bin/python scripts/bench_draft_policy.py [--batches 1 4 16 64 256] [--calls 2000]
"""
from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.engine.speculative.policy import DraftPolicy, StepCost  # noqa: E402


def us_per_call(batch: int, calls: int) -> float:
    policy = DraftPolicy(max_draft=8)
    for rid in range(batch):
        policy.add(rid)
        for _ in range(10):
            policy.record(rid, drafted=8, accepted=8 if rid % 3 == 0 else 7)
    cost = StepCost(tokens=batch, time_s=0.02, draft_token_s=2e-5, eager_s=0.001, graphs=True,
                    max_drafts=max(0, 512 - batch))
    rids = list(range(batch))
    return 1e6 * min(timeit.repeat(lambda: policy.lengths(rids, cost), number=calls,
                                   repeat=3)) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    print(f"{'rows':>5} {'us a step':>10}")
    for batch in args.batches:
        print(f"{batch:>5} {us_per_call(batch, args.calls):>10.1f}")


if __name__ == "__main__":
    main()
