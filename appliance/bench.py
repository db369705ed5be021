"""`tokenspeed bench`: load a running daemon through its OpenAI API and report what users see.

Modes
- latency:    one request at a time; time to first token and decode tokens/s at batch 1.
- throughput: many requests at a fixed concurrency; output tokens/s (and per minute), TTFT, and
              how many requests kept decode speed above `scheduler.tps_floor`.
- agentic:    users running multi-turn conversations whose context grows every turn (previous
              prompt + answer + new tokens), with a pause between turns as a tool call would make;
              reports the prefix-cache hit rate the daemon measured, per-user TPS and TPM.
              `--workload edit`: each user asks, through the chat API, for a file of this
              repository rewritten with a function renamed, then for another rename of the
              previous answer each turn (the answers re-emit the file: what speculative drafts
              taken from the conversation are for).
- greedy:     the greedy token ids of a few seeded prompts, to compare layouts (TP1 vs TP2/TP4).

Prompts are token-id lists (ids 10..499, valid for any vocabulary) sent to /v1/completions with
`ignore_eos`, so input and output lengths are exact, and `return_token_ids`, so the stream has a
chunk per token and every token is timed (dummy-weight models emit ids with no text). The edit
workload is text through /v1/chat/completions instead: the model decides when an answer ends,
and decode TPS is usage.completion_tokens over the time from the first to the last chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from appliance.config import AppConfig


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    decode_tps: float  # (output_tokens - 1) / time from first to last token
    latency_s: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=["latency", "throughput", "agentic", "greedy"])
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--users", type=int, default=4, help="agentic: concurrent conversations")
    parser.add_argument("--turns", type=int, default=4, help="agentic: turns per conversation")
    parser.add_argument("--turn-tokens", type=int, default=256, help="agentic: new tokens per turn")
    parser.add_argument("--tool-time", type=float, default=0.5, help="agentic: pause between turns (s)")
    parser.add_argument("--workload", choices=["random", "edit"], default="random",
                        help="agentic: random token ids, or edits of this repo's files (chat)")
    parser.add_argument("--tcp", action="store_true", help="use TCP instead of the Unix socket")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--seed", type=int, default=0)


def run_bench(config: AppConfig, args: argparse.Namespace) -> int:
    summary = asyncio.run(_run(config, args))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        width = max(map(len, summary))
        for key, value in summary.items():
            value = value if not isinstance(value, list) else json.dumps(value)
            print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


async def _run(config: AppConfig, args: argparse.Namespace) -> dict:
    rng = random.Random(f"{args.seed}-{args.mode}")  # modes draw different prompts: no accidental cache hits
    async with _client(config, args.tcp) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        before = (await http.get("/stats")).json()
        started = time.perf_counter()
        if args.mode == "greedy":
            return {"mode": "greedy", "token_ids": await _greedy(http, model, args, rng)}
        if args.mode == "agentic" and args.workload == "edit":
            results = await _agentic_edit(http, model, args)
        elif args.mode == "agentic":
            results = await _agentic(http, model, args, rng)
        else:
            concurrency = 1 if args.mode == "latency" else args.concurrency
            count = min(args.requests, 8) if args.mode == "latency" else args.requests
            prompts = [_tokens(rng, args.input_len) for _ in range(count)]
            results = await _bounded(concurrency, [
                lambda p=p: _complete(http, model, p, args.output_len) for p in prompts])
        elapsed = time.perf_counter() - started
        after = (await http.get("/stats")).json()
    summary = _summarize(config, args.mode, results, elapsed, before, after)
    if args.mode == "agentic":
        summary["workload"] = args.workload
    return summary


async def _agentic(http: httpx.AsyncClient, model: str, args: argparse.Namespace,
                   rng: random.Random) -> list[RequestResult]:
    async def conversation(user: int) -> list[RequestResult]:
        context = _tokens(rng, args.input_len)
        results = []
        for _ in range(args.turns):
            result, answer = await _complete(http, model, context, args.output_len,
                                             session=f"bench-user-{user}", with_tokens=True)
            results.append(result)
            context = context + answer + _tokens(rng, args.turn_tokens)
            await asyncio.sleep(args.tool_time)
        return results

    per_user = await asyncio.gather(*(conversation(u) for u in range(args.users)))
    return [r for results in per_user for r in results]


# -- the edit workload ----------------------------------------------------------------------------

EDIT_SYSTEM = ("You are a coding assistant. When asked to change a file, reply with the whole "
               "changed file in a single ```python code block and nothing else.")
_EDIT_FILE_CHARS = (1200, 3500)  # a few hundred to ~1K tokens: several turns fit an 8K context


@dataclass(frozen=True)
class EditTask:
    """One user's job: a file of this repository and the names to rename, one per turn."""

    path: str
    text: str
    names: tuple[str, ...]

    def user_message(self, turn: int) -> str:
        name = self.names[turn % len(self.names)]
        if turn == 0:
            return (f"Here is `{self.path}`:\n\n```python\n{self.text}```\n\n"
                    f"Rewrite this file with `{name}` renamed to `{name}_v2`.")
        return f"Now also rename `{name}` to `{name}_v2`. Reply with the whole file again."


def edit_tasks(users: int, seed: int) -> list[EditTask]:
    """A different file for each user (cycling when users outnumber the files)."""
    root = Path(__file__).resolve().parent
    files = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        found = re.findall(r"^\s*(?:def|class) ([A-Za-z]\w*)", text, re.MULTILINE)
        names = tuple(dict.fromkeys(found))  # in order, once each; no dunders
        if _EDIT_FILE_CHARS[0] <= len(text) <= _EDIT_FILE_CHARS[1] and names:
            files.append(EditTask(str(path.relative_to(root.parent)), text, names))
    random.Random(seed).shuffle(files)
    return [files[u % len(files)] for u in range(users)]


def edit_messages(task: EditTask, answers: list[str]) -> list[dict]:
    """The chat so far: the system prompt, then each turn's request and answer, then the next
    request (turn len(answers))."""
    messages = [{"role": "system", "content": EDIT_SYSTEM}]
    for turn, answer in enumerate(answers):
        messages += [{"role": "user", "content": task.user_message(turn)},
                     {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": task.user_message(len(answers))}]


async def _agentic_edit(http: httpx.AsyncClient, model: str,
                        args: argparse.Namespace) -> list[RequestResult]:
    async def conversation(user: int, task: EditTask) -> list[RequestResult]:
        answers: list[str] = []
        results = []
        for _ in range(args.turns):
            result, answer = await _chat(http, model, edit_messages(task, answers), args.output_len,
                                         session=f"bench-edit-{user}")
            results.append(result)
            answers.append(answer)
            await asyncio.sleep(args.tool_time)
        return results

    tasks = edit_tasks(args.users, args.seed)
    per_user = await asyncio.gather(*(conversation(u, t) for u, t in enumerate(tasks)))
    return [r for results in per_user for r in results]


async def _chat(http: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int,
                session: str) -> tuple[RequestResult, str]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    usage = {}
    async for chunk in _sse(http, "/v1/chat/completions", body, session):
        usage = chunk.get("usage") or usage
        delta = chunk["choices"][0].get("delta", {}) if chunk.get("choices") else {}
        if delta.get("content"):
            parts.append(delta["content"])
            stamps.append(time.perf_counter())
    produced = int(usage.get("completion_tokens", 0))
    return _timed(int(usage.get("prompt_tokens", 0)), produced, started, stamps), "".join(parts)


async def _greedy(http: httpx.AsyncClient, model: str, args: argparse.Namespace,
                  rng: random.Random) -> list[list[int]]:
    prompts = [_tokens(rng, args.input_len) for _ in range(min(args.requests, 4))]
    outputs = [await _complete(http, model, p, args.output_len, with_tokens=True) for p in prompts]
    return [token_ids for _, token_ids in outputs]


async def _bounded(limit: int, jobs: list) -> list[RequestResult]:
    gate = asyncio.Semaphore(limit)

    async def one(job):
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


async def _complete(http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int,
                    session: str = "", with_tokens: bool = False):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.0, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    started = time.perf_counter()
    stamps: list[float] = []
    token_ids: list[int] = []
    usage = {}
    async for chunk in _sse(http, "/v1/completions", body, session):
        usage = chunk.get("usage") or usage
        choice = chunk["choices"][0] if chunk.get("choices") else {}
        for token_id in choice.get("token_ids") or []:  # one chunk per token, text or not
            token_ids.append(token_id)
            stamps.append(time.perf_counter())
    produced = int(usage.get("completion_tokens", len(token_ids)))
    result = _timed(len(prompt), produced, started, stamps)
    if not with_tokens:
        return result
    # The next turn resends the answer's exact token ids, as an agent resends the exact text.
    if len(token_ids) != produced:
        raise RuntimeError("the daemon did not return the answer's token ids (return_token_ids)")
    return result, token_ids


async def _sse(http: httpx.AsyncClient, path: str, body: dict, session: str) -> AsyncIterator[dict]:
    """The chunks of a streamed request, parsed ([DONE] left out)."""
    headers = {"x-session-id": session} if session else {}
    async with http.stream("POST", path, json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def _timed(prompt_tokens: int, produced: int, started: float, stamps: list[float]) -> RequestResult:
    """A request's figures from when it started and when each streamed chunk arrived."""
    end = time.perf_counter()
    first = stamps[0] if stamps else end
    decode_time = stamps[-1] - first if len(stamps) > 1 else 0.0
    return RequestResult(prompt_tokens, produced, first - started,
                         (produced - 1) / decode_time if decode_time > 0 else 0.0, end - started)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 500) for _ in range(n)]


def _summarize(config: AppConfig, mode: str, results: list[RequestResult], elapsed: float,
               before: dict, after: dict) -> dict:
    outputs = sum(r.output_tokens for r in results)
    prompts = sum(r.prompt_tokens for r in results)
    tps = sorted(r.decode_tps for r in results)
    ttft = sorted(r.ttft_s for r in results)
    hits = after["totals"]["prefix_cache_hit_tokens"] - before["totals"]["prefix_cache_hit_tokens"]
    return {
        "mode": mode,
        "requests": len(results),
        "prompt_tokens": prompts,
        "output_tokens": outputs,
        "elapsed_s": elapsed,
        "output_tokens_per_s": outputs / elapsed,
        "output_tokens_per_min": 60 * outputs / elapsed,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "decode_tps_min": tps[0] if tps else 0.0,
        "decode_tps_mean": statistics.fmean(tps) if tps else 0.0,
        "tps_floor": config.scheduler.tps_floor,
        "requests_above_floor": sum(t >= config.scheduler.tps_floor for t in tps),
        "prefix_cache_hit_rate": hits / prompts if prompts else 0.0,
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


def _client(config: AppConfig, tcp: bool, timeout_s: float = 600.0) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.server.api_key}"} if config.server.api_key else {}
    timeout = httpx.Timeout(timeout_s)
    if tcp:
        return httpx.AsyncClient(base_url=f"http://{config.server.host}:{config.server.port}",
                                 headers=headers, timeout=timeout)
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=config.server.socket),
                             base_url="http://tokenspeed", headers=headers, timeout=timeout)
