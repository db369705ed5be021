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

Requests are greedy unless `--temperature`, `--top-p`, `--top-k` and `--repetition-penalty` ask
for an agent's sampling (not for `greedy`); the summary says which (`sampling`). Each request
sends all four, so a checkpoint's own sampling defaults (generation_config.json) never apply.

`--concurrency 1,4,16,64` runs throughput at each level in turn; `--plot FILE.png` draws per-user
TPS against TPM over those levels (matplotlib, the `plot` extra). The HTTP clients hold as many
connections as requests in flight are asked for (httpx's default of 100 would hold the rest back
in the client), 16 a client (a pool scans all its connections per request); past 64 streams a
throughput load's clients run in processes of 64 streams each (bench_processes.py: one process
ran out of its core at 256 streams on an H200). While the load runs `/stats` is polled: the
summary reports the running batch the daemon formed (mean/max of requests_running) and says so
when the daemon never had as many requests (running + waiting) as were sent at once. A progress
bar (rich) runs on stderr when it is a terminal (not for a load spread over processes).

Prompts are token-id lists (ids 10..499, valid for any vocabulary) sent to /v1/completions with
`ignore_eos`, so input and output lengths are exact, and `return_token_ids`, so every token's id
is in the stream, text or not, and is timed when its chunk arrives (a chunk a token, or one for
the tokens that reached the frontend together; dummy-weight models emit ids with no text). The edit
workload is text through /v1/chat/completions instead: the model decides when an answer ends,
and decode TPS is usage.completion_tokens over the time from the first to the last chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from appliance.config import AppConfig

STATS_POLL_S = 0.25  # the engine publishes its stats this often
STREAMS_PER_CLIENT = 16  # streams one HTTP client (one httpx pool) carries in a throughput load


class BenchError(Exception):
    """A bench that cannot run as asked (bad arguments, matplotlib missing); the message says why."""


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    decode_tps: float  # (output_tokens - 1) / time from first to last token
    latency_s: float


@dataclass(frozen=True)
class Sampling:
    """The requests' sampling parameters (--temperature, --top-p, --top-k, --repetition-penalty).
    Greedy by default; an agent's own settings measure what its sampling costs the daemon (the
    sampler's work grows from greedy to temperature to top-k / top-p; a penalty adds its own)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sampling:
        return cls(args.temperature, args.top_p, args.top_k, args.repetition_penalty)

    def fields(self) -> dict:
        """The request body's sampling fields, every one sent (a field left out would take the
        model's default); top_k and repetition_penalty: the daemon's extensions to OpenAI's."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty}


GREEDY = Sampling()


@dataclass
class DaemonLoad:
    """requests_running and running + waiting, sampled from /stats while the load runs."""

    running: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=["latency", "throughput", "agentic", "greedy"])
    parser.add_argument("--input-len", type=_positive, default=512,
                        help="prompt tokens a request (default 512)")
    parser.add_argument("--output-len", type=_positive, default=128,
                        help="output tokens a request (default 128)")
    parser.add_argument("--requests", type=_positive, default=32,
                        help="requests in all (default 32)")
    parser.add_argument("--concurrency", type=_levels, default=[8], metavar="N[,N...]",
                        help="requests in flight (throughput); a list (1,4,16,64) sweeps the levels")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="throughput: draw per-user TPS against TPM over the --concurrency levels")
    parser.add_argument("--users", type=int, default=4, help="agentic: concurrent conversations")
    parser.add_argument("--turns", type=int, default=4, help="agentic: turns per conversation")
    parser.add_argument("--turn-tokens", type=int, default=256, help="agentic: new tokens per turn")
    parser.add_argument("--tool-time", type=float, default=0.5, help="agentic: pause between turns (s)")
    parser.add_argument("--workload", choices=["random", "edit"], default="random",
                        help="agentic: random token ids, or edits of this repo's files (chat)")
    parser.add_argument("--tcp", action="store_true", help="use TCP instead of the Unix socket")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--seed", type=int, default=0, help="the load's random seed (default 0)")
    parser.add_argument("--temperature", type=_temperature, default=0.0,
                        help="the requests' sampling temperature (default 0: greedy; not for "
                             "`greedy`)")
    parser.add_argument("--top-p", type=_top_p, default=1.0, help="the requests' top_p (default 1: off)")
    parser.add_argument("--top-k", type=_top_k, default=0, help="the requests' top_k (default 0: off)")
    parser.add_argument("--repetition-penalty", type=_repetition_penalty, default=1.0,
                        help="the requests' repetition_penalty (default 1: off)")


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _top_k(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: off), got {value}")
    return value


def _temperature(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 2] (OpenAI's range), got {value}")
    return value


def _top_p(text: str) -> float:
    value = _finite(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _repetition_penalty(text: str) -> float:
    value = _finite(text)
    if not 0.0 < value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 2], got {value}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,... (e.g. 1,4,16,64), got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return levels


def run_bench(config: AppConfig, args: argparse.Namespace) -> int:
    try:
        _check_arguments(args)
        summaries = asyncio.run(_run_all(config, args))
        if args.plot:
            plot_sweep(summaries, args.plot, config)
    except BenchError as e:
        print(f"tokenspeed bench: {e}", file=sys.stderr)
        return 2
    except httpx.TransportError as e:  # no daemon there, or it went away mid-run
        where = f"port {config.server.port}" if args.tcp else config.server.socket
        print(f"tokenspeed bench: no daemon answers on {where} ({e or type(e).__name__}); "
              "start one with `tokenspeed up` (same -c/--set)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
        return 0
    print("\n\n".join(_format(summary) for summary in summaries))
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    if len(args.concurrency) > 1 and args.mode != "throughput":
        raise BenchError("a list of --concurrency levels is a throughput sweep: use `bench throughput`")
    if args.mode == "greedy" and Sampling.from_args(args) != GREEDY:
        raise BenchError("`bench greedy` compares greedy tokens: --temperature / --top-p / "
                         "--top-k / --repetition-penalty are for the other modes")
    if args.plot is not None:
        if args.mode != "throughput":
            raise BenchError("--plot draws a throughput sweep: use `bench throughput --concurrency 1,4,16`")
        _pyplot()  # fail before the load, not after it


async def _run_all(config: AppConfig, args: argparse.Namespace) -> list[dict]:
    levels = args.concurrency if args.mode == "throughput" else [_in_flight(args)]
    async with _client(config, args.tcp, max(levels)) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        return [await _run(config, args, http, model, level) for level in levels]


def _in_flight(args: argparse.Namespace) -> int:
    """Requests a non-sweep mode has in flight at once."""
    return {"agentic": args.users, "throughput": args.concurrency[0]}.get(args.mode, 1)


async def _run(config: AppConfig, args: argparse.Namespace, http: httpx.AsyncClient, model: str,
               concurrency: int) -> dict:
    # Modes (and levels) draw different prompts: no accidental cache hits between them.
    rng = random.Random(f"{args.seed}-{args.mode}-{concurrency}")
    sampling = Sampling.from_args(args)
    before = (await http.get("/stats")).json()
    load = DaemonLoad()
    if args.mode == "greedy":
        prompts = [_tokens(rng, args.input_len) for _ in range(min(args.requests, 4))]
        async with _progress("greedy", len(prompts)) as advance:
            outputs = [await _counted(advance, complete(http, model, p, args.output_len, with_tokens=True))
                       for p in prompts]
        return {"mode": "greedy", "token_ids": [token_ids for _, token_ids in outputs]}
    started = time.perf_counter()
    async with _watch_daemon(http, load):
        if args.mode == "agentic":
            async with _progress("agentic turns", args.users * args.turns) as advance:
                agentic = _agentic_edit if args.workload == "edit" else _agentic
                results = await agentic(http, model, args, rng, advance, sampling)
        else:
            count = min(args.requests, 8) if args.mode == "latency" else args.requests
            prompts = [_tokens(rng, args.input_len) for _ in range(count)]
            from appliance.bench_processes import processes_for, run_in_processes  # imports bench
            if processes_for(concurrency) > 1:
                started, results = await run_in_processes(config, args.tcp, model, prompts,
                                                          args.output_len, concurrency, sampling)
            else:
                async with _progress(f"{args.mode} at concurrency {concurrency}", count) as advance, \
                        stream_clients(config, args.tcp, concurrency) as clients:
                    results = await bounded(concurrency, clients, [
                        lambda client, p=p: _counted(advance, complete(client, model, p, args.output_len,
                                                                        sampling=sampling))
                        for p in prompts])
    elapsed = time.perf_counter() - started
    after = await _stats_covering(http, before, sum(r.prompt_tokens for r in results))
    expected = min(concurrency, len(results))
    summary = _summarize(config, args.mode, concurrency, results, elapsed, before, after, load, expected)
    summary["sampling"] = sampling.fields()
    if args.mode == "agentic":
        summary["workload"] = args.workload
    return summary


async def _stats_covering(http: httpx.AsyncClient, before: dict, prompt_tokens: int,
                          wait_s: float = 2.0) -> dict:
    """/stats once its totals count every prompt the run sent: the engine reports them every
    0.25 s, so a read right after a short run can miss the last admissions (and their prefix
    cache hits). After `wait_s` the latest snapshot, whatever it counts."""
    deadline = time.monotonic() + wait_s
    while True:
        after = (await http.get("/stats")).json()
        counted = (after["totals"].get("prompt_tokens", prompt_tokens)
                   - before["totals"].get("prompt_tokens", 0))
        if counted >= prompt_tokens or time.monotonic() > deadline:
            return after
        await asyncio.sleep(0.05)


@asynccontextmanager
async def _watch_daemon(http: httpx.AsyncClient, load: DaemonLoad):
    """Sample /stats every STATS_POLL_S while the body runs."""
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            try:
                requests = (await http.get("/stats")).json()["requests"]
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            else:
                load.running.append(int(requests["running"]))
                load.in_flight.append(int(requests["running"]) + int(requests["waiting"]))
            try:
                await asyncio.wait_for(stop.wait(), STATS_POLL_S)
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
                pass

    task = asyncio.create_task(watch())
    try:
        yield load
    finally:
        stop.set()
        await task


@asynccontextmanager
async def _progress(description: str, total: int):
    """A rich progress bar on stderr (only when it is a terminal); yields `advance()`."""
    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=True,
                   disable=not console.is_terminal)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


async def _counted(advance: Callable[[], None], job: Awaitable):
    result = await job
    advance()
    return result


async def _agentic(http: httpx.AsyncClient, model: str, args: argparse.Namespace,
                   rng: random.Random, advance: Callable[[], None],
                   sampling: Sampling) -> list[RequestResult]:
    async def conversation(user: int) -> list[RequestResult]:
        context = _tokens(rng, args.input_len)
        results = []
        for _ in range(args.turns):
            result, answer = await complete(http, model, context, args.output_len,
                                            session=f"bench-user-{user}", with_tokens=True,
                                            sampling=sampling)
            advance()
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


async def _agentic_edit(http: httpx.AsyncClient, model: str, args: argparse.Namespace,
                        rng: random.Random, advance: Callable[[], None],
                        sampling: Sampling) -> list[RequestResult]:
    async def conversation(user: int, task: EditTask) -> list[RequestResult]:
        answers: list[str] = []
        results = []
        for _ in range(args.turns):
            result, answer = await _chat(http, model, edit_messages(task, answers), args.output_len,
                                         session=f"bench-edit-{user}", sampling=sampling)
            advance()
            results.append(result)
            answers.append(answer)
            await asyncio.sleep(args.tool_time)
        return results

    tasks = edit_tasks(args.users, args.seed)
    per_user = await asyncio.gather(*(conversation(u, t) for u, t in enumerate(tasks)))
    return [r for results in per_user for r in results]


async def _chat(http: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int,
                session: str, sampling: Sampling = GREEDY) -> tuple[RequestResult, str]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            **sampling.fields(), "stream_options": {"include_usage": True}}
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


async def bounded(limit: int, clients: list[httpx.AsyncClient],
                  jobs: list[Callable[[httpx.AsyncClient], Awaitable[RequestResult]]]
                  ) -> list[RequestResult]:
    """Run `jobs` in order, `limit` at a time: `limit` workers, each taking the next job when
    its last ends, worker w sending on client w % len(clients) (so no client has more streams
    than its pool holds)."""
    results: list[RequestResult | None] = [None] * len(jobs)
    pending = iter(enumerate(jobs))

    async def worker(client: httpx.AsyncClient) -> None:
        for i, job in pending:   # one iterator: each job goes to one worker
            results[i] = await job(client)

    await asyncio.gather(*(worker(clients[w % len(clients)]) for w in range(limit)))
    return results  # type: ignore[return-value]


async def complete(http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int,
                   session: str = "", with_tokens: bool = False, sampling: Sampling = GREEDY):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, **sampling.fields(), "stream_options": {"include_usage": True},
            "return_token_ids": True}
    started = time.perf_counter()
    stamps: list[float] = []
    token_ids: list[int] = []
    usage = {}
    async for chunk in _sse(http, "/v1/completions", body, session):
        usage = chunk.get("usage") or usage
        choice = chunk["choices"][0] if chunk.get("choices") else {}
        for token_id in choice.get("token_ids") or []:  # every token's, text or not
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


def _error_message(body: str) -> str:
    """The API error's message (OpenAI's and Anthropic's shapes), else the body."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body
    return error.get("message", body) if isinstance(error, dict) else body


async def _sse(http: httpx.AsyncClient, path: str, body: dict, session: str) -> AsyncIterator[dict]:
    """The chunks of a streamed request, parsed ([DONE] left out)."""
    headers = {"x-session-id": session} if session else {}
    for attempt in range(2):
        answered = False
        try:
            async with http.stream("POST", path, json=body, headers=headers) as response:
                answered = True
                if response.status_code != 200:
                    raise BenchError(f"the daemon answered HTTP {response.status_code}: "
                                     f"{_error_message((await response.aread()).decode())}")
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        yield json.loads(line[6:])
            return
        except httpx.RemoteProtocolError:
            # A pooled connection the server closed as the request went out: no response
            # began, so sending it again on a fresh connection is safe (once).
            if attempt or answered:
                raise


def _timed(prompt_tokens: int, produced: int, started: float, stamps: list[float]) -> RequestResult:
    """A request's figures from when it started and when each streamed chunk arrived."""
    end = time.perf_counter()
    first = stamps[0] if stamps else end
    decode_time = stamps[-1] - first if len(stamps) > 1 else 0.0
    return RequestResult(prompt_tokens, produced, first - started,
                         (produced - 1) / decode_time if decode_time > 0 else 0.0, end - started)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 500) for _ in range(n)]


def _summarize(config: AppConfig, mode: str, concurrency: int, results: list[RequestResult],
               elapsed: float, before: dict, after: dict, load: DaemonLoad, expected: int) -> dict:
    outputs = sum(r.output_tokens for r in results)
    prompts = sum(r.prompt_tokens for r in results)
    tps = sorted(r.decode_tps for r in results)
    ttft = sorted(r.ttft_s for r in results)
    hits = after["totals"]["prefix_cache_hit_tokens"] - before["totals"]["prefix_cache_hit_tokens"]
    summary = {
        "mode": mode,
        "concurrency": concurrency,
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
        **_speculation(before, after),
        "daemon_running_mean": statistics.fmean(load.running) if load.running else 0.0,
        "daemon_running_max": max(load.running, default=0),
        "daemon_in_flight_max": max(load.in_flight, default=0),
        "daemon_samples": len(load.running),
    }
    warning = fewer_in_flight_warning(load, expected)
    if warning:
        summary["warning"] = warning
    return summary


def fewer_in_flight_warning(load: DaemonLoad, expected: int) -> str | None:
    """Said when the daemon never held as many requests as were sent at once (judged only
    over a run long enough to be sampled a few times)."""
    if len(load.in_flight) < 3 or max(load.in_flight) >= expected:
        return None
    return (f"the daemon never had more than {max(load.in_flight)} requests in flight (running + "
            f"waiting, {len(load.in_flight)} samples of /stats), fewer than the {expected} sent at once")


def _format(summary: dict) -> str:
    width = max(map(len, summary))
    lines = []
    for key, value in summary.items():
        value = value if not isinstance(value, list) else json.dumps(value)
        lines.append(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return "\n".join(lines)


def _speculation(before: dict, after: dict) -> dict:
    """The daemon's speculative-decoding figures over the run (zeros with speculation off)."""
    def delta(key: str) -> int:
        return after.get("speculative", {}).get(key, 0) - before.get("speculative", {}).get(key, 0)

    drafted, accepted, rows = delta("draft_tokens"), delta("accepted_tokens"), delta("verify_rows")
    return {"spec_draft_tokens": drafted, "spec_accepted_tokens": accepted,
            "spec_acceptance_rate": accepted / drafted if drafted else 0.0,
            "spec_mean_accepted_length": 1 + accepted / rows if rows else 0.0}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


def plot_sweep(summaries: list[dict], path: Path, config: AppConfig) -> None:
    """Per-user TPS (mean decode tokens/s of a request) against TPM (output tokens per minute
    of all requests), a point per concurrency level, with the TPS floor."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tpm = [s["output_tokens_per_min"] for s in summaries]
    tps = [s["decode_tps_mean"] for s in summaries]
    ax.plot(tpm, tps, marker="o")
    for s, x, y in zip(summaries, tpm, tps):
        ax.annotate(f"{s['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4))
    floor = config.scheduler.tps_floor
    if floor:
        ax.axhline(floor, color="tab:red", linestyle="--", label=f"TPS floor {floor:g}")
        ax.legend()
    ax.set_xlabel("TPM: output tokens per minute, all requests")
    ax.set_ylabel("TPS per user: decode tokens/s")
    first = summaries[0]
    per_request = max(first["requests"], 1)
    ax.set_title(f"{config.model.model_name}: {first['prompt_tokens'] // per_request} in / "
                 f"{first['output_tokens'] // per_request} out; points labelled by requests in flight")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise BenchError(f"cannot write the plot to {path}: {e}") from None
    finally:
        plt.close(fig)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'tokenspeed[plot]'") from None
    return plt


@asynccontextmanager
async def stream_clients(config: AppConfig, tcp: bool,
                         concurrency: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Clients of STREAMS_PER_CLIENT streams each for `concurrency` streams. httpx's pool scans
    every connection it holds each time a request starts or ends: with one pool of 256, that
    scan was a fifth of the bench client's CPU, and the client, not the daemon, ran out of core
    at 256 streams on an H200."""
    count = -(-concurrency // STREAMS_PER_CLIENT)
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(_client(config, tcp, STREAMS_PER_CLIENT))
               for _ in range(count)]


def _client(config: AppConfig, tcp: bool, concurrency: int,
            timeout_s: float = 600.0) -> httpx.AsyncClient:
    """A client whose pool holds `concurrency` streams plus the /stats poller (httpx's default
    pool of 100 would queue the rest in the client, unseen by the daemon)."""
    headers = {"Authorization": f"Bearer {config.server.api_key}"} if config.server.api_key else {}
    timeout = httpx.Timeout(timeout_s)
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    if tcp:
        return httpx.AsyncClient(base_url=f"http://{config.server.host}:{config.server.port}",
                                 headers=headers, timeout=timeout, limits=limits)
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=config.server.socket, limits=limits),
                             base_url="http://tokenspeed", headers=headers, timeout=timeout)
