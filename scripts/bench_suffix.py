#!/usr/bin/env python3
"""Cost of suffix-decoding drafts (`_core.SuffixTree` through `SuffixDraft`) on agent-sized
contexts: building the tree of a 100K-token prompt, and then, per generated token, extending it
and proposing a draft (what the engine pays every decode step of every request).

The text is code: this repository's source files, tokenized with the daemon's tokenizer (the
default config's), concatenated and repeated until long enough, as an agent's context repeats
the files it read. Generation replays a rewrite of one of those files, so drafts are found.

    .venv/bin/python scripts/bench_suffix.py                  # 100K prompt, depth 32
    .venv/bin/python scripts/bench_suffix.py --prompt 150000 --depth 64 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance._core import SuffixTree  # noqa: E402
from appliance.engine.speculative.suffix import SuffixDraft, SuffixParams  # noqa: E402


def code_tokens(n: int) -> np.ndarray:
    """n token ids of this repository's Python sources (repeated if they are fewer)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from appliance.config import load_config
    from appliance.engine.model_files import resolve_model_files

    logging.set_verbosity_error()  # longer than the model's context: only token ids are wanted
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_files(load_config()).tokenizer)
    ids: list[int] = []
    for path in sorted((ROOT / "appliance").rglob("*.py")):
        ids += tokenizer.encode(path.read_text(), add_special_tokens=False)
        if len(ids) >= n:
            break
    reps = -(-n // len(ids))
    return np.tile(np.asarray(ids, dtype=np.int32), reps)[:n]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def generate(params: SuffixParams, prompt: np.ndarray, answer: list[int],
             max_draft: int) -> tuple[float, float, int]:
    """Seconds spent extending and proposing over the answer, one token per step (the most
    calls per token), and the tokens drafted."""
    source = SuffixDraft(params)
    source.start(0, prompt, "")
    source.indexed_tokens(0)  # waits until the worker thread has indexed the prompt
    extend_s = propose_s = 0.0
    drafted = 0
    for token in answer:
        t0 = time.perf_counter()
        draft = source.propose(0, max_draft)
        t1 = time.perf_counter()
        source.extend(0, [token])
        t2 = time.perf_counter()
        propose_s += t1 - t0
        extend_s += t2 - t1
        drafted += len(draft)
    return extend_s, propose_s, drafted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=100_000, help="prompt tokens")
    parser.add_argument("--generate", type=int, default=2000, help="tokens generated after it")
    parser.add_argument("--depth", type=int, default=SuffixParams.max_depth)
    parser.add_argument("--max-draft", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    text = code_tokens(args.prompt + args.generate)
    prompt = text[:args.prompt]
    # The answer rewrites a stretch of the prompt with a few tokens changed, as an edit does.
    answer = text[args.prompt // 3:args.prompt // 3 + args.generate].copy()
    answer[::97] = 7

    build_s = best_of(args.repeats, lambda: SuffixTree(args.depth).add(prompt))
    tree = SuffixTree(args.depth)
    tree.add(prompt)

    params = SuffixParams(max_depth=args.depth)
    runs = [generate(params, prompt, answer.tolist(), args.max_draft) for _ in range(args.repeats)]
    extend_s, propose_s, drafted = min(runs)
    n = len(answer)
    out = {
        "prompt_tokens": args.prompt,
        "max_depth": args.depth,
        "build_ms": 1e3 * build_s,
        "build_us_per_token": 1e6 * build_s / args.prompt,
        "tree_nodes": tree.num_nodes,
        "tree_mb": tree.memory_bytes / 1e6,
        "extend_us_per_token": 1e6 * extend_s / n,
        "propose_us_per_call": 1e6 * propose_s / n,
        "drafted_per_call": drafted / n,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        width = max(map(len, out))
        for key, value in out.items():
            print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float)
                  else f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
