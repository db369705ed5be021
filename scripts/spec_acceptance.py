#!/usr/bin/env python3
"""Acceptance of speculative draft sources on real text, offline.

1. Runs the edit workload (`tokenspeed bench agentic --workload edit`: users ask for a file of
   this repository rewritten with a function renamed, then another rename each turn) through a
   running daemon with greedy sampling, and records every request's prompt and output token ids.
   Prompts are the chat template rendered here with the daemon's tokenizer (as the chat API
   renders them) and sent to /v1/completions with `return_token_ids`, so the ids are exact.
2. Replays the token streams through each draft source at batch 1: before each verify step the
   source proposes k tokens; the step accepts the longest prefix that equals the output and adds
   the target's own next token. For greedy sampling this is exact: whether a draft token is
   accepted depends only on the target's greedy tokens, which speculation does not change.

Reports, per source and k = 1..8, the mean tokens per verify step (accepted drafts + the
target's token; 1.0 without speculation), the acceptance rate and the time the source took;
and what the smallest token tree (a second branch at the first draft) could add at most: the
share of steps whose first draft missed, and the tokens per step if each of those had accepted
k drafts on the other branch.

`--oracle` replaces the model by one that makes each edit exactly (the file with the names
renamed, in a code block): no daemon, the daemon's tokenizer only. A small model's answers are
not faithful rewrites (SmolLM2-135M drifts into repetition, which drafts predict too), so this
is the figure for a model that does the task.

    tokenspeed up &                                      # speculation off, the default model
    .venv/bin/python scripts/spec_acceptance.py --users 4 --turns 3 --save /tmp/edit-trace.json
    .venv/bin/python scripts/spec_acceptance.py --load /tmp/edit-trace.json    # replay only
    .venv/bin/python scripts/spec_acceptance.py --oracle --users 8                # exact edits
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.bench import _client, edit_messages, edit_tasks  # noqa: E402
from appliance.config import load_config  # noqa: E402


@dataclass
class Request:
    session: str
    turn: int
    prompt: list[int]
    output: list[int]


# -- 1. the trace ----------------------------------------------------------------------------------

def tokenizer_of(config):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from appliance.engine.model_files import resolve_model_files

    logging.set_verbosity_error()  # prompts may exceed the model's context: ids are all we want
    return AutoTokenizer.from_pretrained(resolve_model_files(config).tokenizer)


def prompt_ids(tokenizer, task, answers: list[str]) -> list[int]:
    """The chat so far, rendered and encoded as the chat API does."""
    from appliance.server.prompt import render_chat

    text = render_chat(tokenizer, edit_messages(task, answers), None, {})
    return list(tokenizer.encode(text, add_special_tokens=False))


def oracle(config, users: int, turns: int, seed: int) -> list[Request]:
    """Each answer is the edit made exactly: the file so far with the turn's name renamed."""
    tokenizer = tokenizer_of(config)
    requests = []
    for user, task in enumerate(edit_tasks(users, seed)):
        answers: list[str] = []
        text = task.text
        for turn in range(turns):
            prompt = prompt_ids(tokenizer, task, answers)
            name = task.names[turn % len(task.names)]
            text = re.sub(rf"\b{name}\b", f"{name}_v2", text)
            answers.append(f"```python\n{text}```")
            output = list(tokenizer.encode(answers[-1], add_special_tokens=False))
            requests.append(Request(f"edit-{user}", turn, prompt, output))
    return requests


async def record(config, users: int, turns: int, max_tokens: int, seed: int,
                 save: Path | None) -> list[Request]:
    tokenizer = tokenizer_of(config)
    requests: list[Request] = []

    async def conversation(http, model: str, user: int, task) -> None:
        answers: list[str] = []
        for turn in range(turns):
            prompt = prompt_ids(tokenizer, task, answers)
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0.0, "return_token_ids": True}
            session = f"edit-{user}"
            response = await http.post("/v1/completions", json=body,
                                       headers={"x-session-id": session})
            response.raise_for_status()
            output = response.json()["choices"][0]["token_ids"]
            requests.append(Request(session, turn, prompt, output))
            answers.append(tokenizer.decode(output, skip_special_tokens=True))
            if save:  # as it goes: a slow CPU run that fails late keeps what it recorded
                save.write_text(json.dumps([asdict(r) for r in requests]))

    async with _client(config, tcp=False, concurrency=users, timeout_s=24 * 3600) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        tasks = edit_tasks(users, seed)
        await asyncio.gather(*(conversation(http, model, u, t) for u, t in enumerate(tasks)))
    return requests


# -- 2. the replay ---------------------------------------------------------------------------------

def draft_sources() -> dict:
    from appliance.engine.speculative import DRAFT_SOURCES

    return DRAFT_SOURCES


def replay(make_source, trace: list[Request], k: int) -> dict:
    """Batch 1, in turn order: each request runs to its end before the next starts."""
    source = make_source()
    steps = tokens = drafted = accepted = missed_first = 0
    spent = 0.0
    for rid, req in enumerate(trace):
        t0 = time.perf_counter()
        source.start(rid, req.prompt, req.session)
        spent += time.perf_counter() - t0
        i = 0
        while i < len(req.output):
            t0 = time.perf_counter()
            draft = source.propose(rid, k)
            spent += time.perf_counter() - t0
            n = 0
            while n < len(draft) and i + n < len(req.output) and draft[n] == req.output[i + n]:
                n += 1
            step = req.output[i:i + n + 1]  # the accepted drafts, then the target's own token
            t0 = time.perf_counter()
            source.extend(rid, step)
            spent += time.perf_counter() - t0
            steps += 1
            drafted += len(draft)
            accepted += n
            missed_first += bool(draft) and n == 0
            tokens += len(step)
            i += len(step)
        source.finish(rid)
    # A second branch at the first draft helps only a step whose first draft missed: at most
    # (the bound) it accepts k drafts there.
    return {"tokens_per_step": tokens / max(steps, 1),
            "tree_bound_tokens_per_step": (tokens + k * missed_first) / max(steps, 1),
            "missed_first": missed_first / max(steps, 1),
            "acceptance_rate": accepted / max(drafted, 1),
            "drafted_per_step": drafted / max(steps, 1),
            "source_us_per_token": 1e6 * spent / max(tokens, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default=None, help="the daemon's YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=1024, help="per answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-draft", type=int, default=8, help="k = 1..this")
    parser.add_argument("--save", type=Path, help="write the recorded trace here (JSON)")
    parser.add_argument("--load", type=Path, help="replay a saved trace; no daemon needed")
    parser.add_argument("--oracle", action="store_true",
                        help="answers are the edits made exactly; no daemon needed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    config = load_config(args.config, args.set)
    if args.load:
        trace = [Request(**r) for r in json.loads(args.load.read_text())]
    elif args.oracle:
        trace = oracle(config, args.users, args.turns, args.seed)
    else:
        trace = asyncio.run(record(config, args.users, args.turns, args.max_tokens, args.seed,
                                   args.save))
    trace.sort(key=lambda r: (r.turn, r.session))  # turn by turn, as at batch 1
    if args.save and args.oracle:
        args.save.write_text(json.dumps([asdict(r) for r in trace]))

    results = {name: {k: replay(make, trace, k) for k in range(1, args.max_draft + 1)}
               for name, make in draft_sources().items()}
    summary = {"requests": len(trace),
               "prompt_tokens": sum(len(r.prompt) for r in trace),
               "output_tokens": sum(len(r.output) for r in trace),
               "results": results}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['requests']} requests, {summary['prompt_tokens']} prompt tokens, "
          f"{summary['output_tokens']} output tokens (greedy, batch 1)")
    print(f"{'source':<8} {'k':>2} {'tokens/step':>11} {'tree bound':>10} {'missed 1st':>10} "
          f"{'accept':>7} {'drafted/step':>12} {'us/token':>9}")
    for name, by_k in results.items():
        for k, r in by_k.items():
            print(f"{name:<8} {k:>2} {r['tokens_per_step']:>11.3f} "
                  f"{r['tree_bound_tokens_per_step']:>10.3f} {r['missed_first']:>10.3f} "
                  f"{r['acceptance_rate']:>7.3f} {r['drafted_per_step']:>12.2f} "
                  f"{r['source_us_per_token']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
