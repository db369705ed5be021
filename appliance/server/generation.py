"""One request through the engine: token ids in, API-neutral events out.

Pipeline per token: incremental detokenizer -> stop strings -> the tool-call format's parser
(calls, reasoning channels). Also records the request for /stats and the latency histograms,
and aborts the request in the engine whenever the consumer goes away (client disconnect, stop
string, server shutdown).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request

from appliance.engine.client import EngineFailed, EngineRejected
from appliance.engine.protocol import Constraint, GenerateRequest, TokenLogprobs, TokenOutput
from appliance.server.detokenize import IncrementalDetokenizer
from appliance.server.errors import RETRY_AFTER_S, ApiError
from appliance.server.state import AppState
from appliance.server.stop_strings import StopStringMatcher
from appliance.server.tool_parsers import (ParsedToolCall, Piece, Reasoning, ToolCallArgs, ToolCallEnd,
                                           ToolCallFormat, ToolCallStart, ToolChoice, ToolSpec)
from appliance.server.tracker import TrackedRequest


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # the engine's per-row logits processors and log-probabilities (GenerateRequest's fields)
    logit_bias: tuple[tuple[int, float], ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None
    constraint: Constraint | None = None
    speculative: bool = True  # False: no draft tokens for this request


@dataclass(frozen=True)
class GenerationJob:
    prompt_ids: list[int]
    sampling: SamplingOptions
    chat: bool = False  # a chat reply: parse the format's markup (calls of `tools`, reasoning)
    tools: tuple[ToolSpec, ...] = ()  # the calls to parse (none: tools are off)
    # tool_choice forced calls (its grammar allows no text): text the parser gives back when the
    # output ends is a call's header cut off by max_tokens, markup rather than an answer
    calls_only: bool = False
    session: str = ""
    user: str = ""
    arrived_at: float | None = None  # monotonic time the HTTP request arrived (TTFT starts there)
    token_events: bool = False  # also yield each generated token's id (TokenDelta / TokenIds)

    @classmethod
    def chat_reply(cls, prompt_ids: list[int], sampling: SamplingOptions, tools: list[ToolSpec],
                   choice: ToolChoice | None, **fields: Any) -> "GenerationJob":
        """A chat endpoint's job: calls of `tools` parsed unless `choice` is None (tools off),
        calls only when it forces them."""
        return cls(prompt_ids, sampling, chat=True, tools=tuple(tools) if choice else (),
                   calls_only=bool(choice and choice.forced), **fields)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class TokenDelta:
    """One generated token id with its log-probabilities, ahead of its text, for jobs that
    asked for them (not for a final end of sequence). For `token_events` jobs `text` carries
    the token's text when that is plain text (one TextDelta, then not sent apart): a stream
    sends the two in one chunk, not two."""

    token_id: int
    logprobs: TokenLogprobs
    text: str = ""


@dataclass(frozen=True)
class TokenIds:
    """Generated token ids, for `token_events` jobs without log-probabilities, and `text`, the
    plain text they brought (TextDeltas, then not sent apart)."""

    token_ids: tuple[int, ...]
    text: str = ""


@dataclass(frozen=True)
class Prefilled:
    """The engine's first output arrived: the prompt is in the KV cache, `cached_tokens` of it
    reused from the prefix cache."""

    cached_tokens: int


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of sequence) | "length" | "stop_sequence" | "abort"
    prompt_tokens: int
    completion_tokens: int
    num_tool_calls: int = 0
    stop_sequence: str | None = None
    token_ids: tuple[int, ...] = ()  # every generated token id, in order
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    reasoning_tokens: int = 0  # generated while the output was in a reasoning channel
    cut_call: bool = False  # the output ended inside a call's arguments (a stop string, say)

    @property
    def called_tools(self) -> bool:
        """A call was really made: complete calls, and the output ended on its own (at its end
        of sequence, or at a stop string outside any call)."""
        return (bool(self.num_tool_calls) and self.reason in ("stop", "stop_sequence")
                and not self.cut_call)


Event = TextDelta | TokenDelta | TokenIds | Prefilled | Reasoning | ToolCallStart | ToolCallArgs | ToolCallEnd | Finished


class OutputPipeline:
    """Detokenize, cut at stop strings, split out tool calls and reasoning."""

    def __init__(self, tokenizer: Any, tool_format: ToolCallFormat, job: GenerationJob) -> None:
        parse = job.chat and (bool(job.tools) or tool_format.always_parse)
        self._parser = tool_format.parser(list(job.tools)) if parse else None
        keep = frozenset(tool_format.markers) if parse else frozenset()
        self._detok = IncrementalDetokenizer(tokenizer, job.prompt_ids, keep)
        self._stops = StopStringMatcher(job.sampling.stop)
        self._calls_only = job.calls_only

    @property
    def num_tool_calls(self) -> int:
        return self._parser.num_calls if self._parser else 0

    @property
    def cut_call(self) -> bool:
        return bool(self._parser and self._parser.cut_call)

    @property
    def in_reasoning(self) -> bool:
        return bool(self._parser and self._parser.in_reasoning)

    def push(self, token_id: int, last: bool, decode: bool) -> tuple[list[Event], str | None]:
        """Events for one engine output, and the stop string that ended the output (if any)."""
        text = self._detok.push(token_id) if decode else ""
        if last:
            text += self._detok.flush()
        emit, matched = self._stops.feed(text)
        if matched is None and not last:
            return self._route(emit), None
        if matched is None:
            emit += self._stops.flush()
        return self._route(emit) + self._finish(), matched

    def _route(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._parser is None:
            return [TextDelta(text)]
        return _events(self._parser.feed(text))

    def _finish(self) -> list[Event]:
        if self._parser is None:
            return []
        pieces = self._parser.finish()
        if self._calls_only:
            pieces = [p for p in pieces if not isinstance(p, str)]
        return _events(pieces)


def _events(pieces: list[Piece]) -> list[Event]:
    return [TextDelta(p) if isinstance(p, str) else p for p in pieces]


def engine_request(rid: int, job: GenerationJob) -> GenerateRequest:
    sampling = job.sampling
    return GenerateRequest(
        rid=rid, prompt_ids=list(job.prompt_ids), max_new_tokens=sampling.max_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        seed=sampling.seed, ignore_eos=sampling.ignore_eos, session=job.session, user=job.user,
        constraint=sampling.constraint, logit_bias=dict(sampling.logit_bias),
        repetition_penalty=sampling.repetition_penalty, presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty, min_tokens=sampling.min_tokens,
        logprobs=sampling.logprobs,
        speculative=sampling.speculative)


@dataclass
class _Progress:
    """A request's outputs so far, as `generate` goes."""

    token_ids: list[int] = field(default_factory=list)
    cached: int = 0
    reasoning_tokens: int = 0
    prefilled: bool = False


def require_engine(state: AppState) -> None:
    """Refuse a request the engine cannot take now, before any response starts: 503, with
    Retry-After while the engine (re)starts. The SDKs retry a 503 on their own, but never an
    error event inside a 200 stream, which is what a stream started into a restart got."""
    if state.engine_healthy:
        return
    status = state.engine_status
    if status in ("restarting", "starting"):
        raise ApiError(503, f"The engine is {status}; retry shortly", retry_after_s=RETRY_AFTER_S)
    raise ApiError(503, f"The engine is not serving ({status})")


async def generate(state: AppState, job: GenerationJob) -> AsyncIterator[Event]:
    """Run `job` in the engine; yields one `Prefilled`, text / reasoning / tool-call events and
    exactly one final `Finished`. The outputs that arrive together (a speculative step's
    tokens, or several steps' when the frontend fell behind) yield their text as one event."""
    client = state.client
    rid = client.new_rid()
    tracked = state.tracker.start(rid, job.user, len(job.prompt_ids), job.arrived_at, job.session)
    pipeline = OutputPipeline(state.tokenizer, state.tool_format, job)
    stream = client.generate(engine_request(rid, job))
    progress = _Progress()
    try:
        async for batch in _engine_outputs(state, stream, progress.token_ids):
            events, finished = _batch_events(state, job, pipeline, tracked, batch, progress)
            if finished is not None and finished.stop_sequence is not None:
                await _close(stream)  # aborts the request in the engine (INTERFACES §4)
            for event in coalesce(events):
                yield event
            if finished is not None:
                return
        raise ApiError(503, "The engine stopped before the request finished")
    finally:
        state.tracker.finish(rid)
        await _close(stream)


def _batch_events(state: AppState, job: GenerationJob, pipeline: OutputPipeline, tracked: TrackedRequest,
                  batch: list[TokenOutput], progress: _Progress) -> tuple[list[Event], Finished | None]:
    """A batch of engine outputs' events, up to the output that ends the request (its finish
    reason, or a stop string it completed), then the `Finished` event (also returned)."""
    events: list[Event] = []
    for out in batch:
        matched = _output_events(state, job, pipeline, tracked, out, progress, events)
        if matched is not None or out.finish_reason is not None:
            reason = "stop_sequence" if matched is not None else str(out.finish_reason)
            finished = Finished(reason, len(job.prompt_ids), len(progress.token_ids),
                                pipeline.num_tool_calls, matched, tuple(progress.token_ids),
                                progress.cached, progress.reasoning_tokens, pipeline.cut_call)
            events.append(finished)
            return events, finished
    return events, None


def _output_events(state: AppState, job: GenerationJob, pipeline: OutputPipeline, tracked: TrackedRequest,
                   out: TokenOutput, progress: _Progress, events: list[Event]) -> str | None:
    """Add one engine output's events to `events`; the stop string it completed, if any."""
    if not progress.prefilled:
        progress.prefilled, progress.cached = True, out.cached_tokens or 0
        events.append(Prefilled(progress.cached))
    decodes = _decodes(state, out)
    logprobs = None
    if out.token_id >= 0:
        progress.token_ids.append(out.token_id)
        state.metrics.observe(*state.tracker.on_token(tracked))
        logprobs = out.logprobs if decodes else None
    new, matched = pipeline.push(out.token_id, out.finish_reason is not None, decodes)
    progress.reasoning_tokens += out.token_id >= 0 and pipeline.in_reasoning
    if out.token_id >= 0 and (job.token_events or logprobs is not None):
        text = ""
        if job.token_events and len(new) == 1 and isinstance(new[0], TextDelta):
            text, new = new[0].text, []
        events.append(TokenDelta(out.token_id, logprobs, text) if logprobs is not None
                      else TokenIds((out.token_id,), text))
    events.extend(new)
    return matched


def coalesce(events: list[Event]) -> list[Event]:
    """Adjacent text, reasoning, token ids (with the text after them), and argument deltas of
    one call, each joined into one event: a stream then sends one chunk for them, not one a
    token."""
    if len(events) < 2:  # one token's text, while the frontend keeps up
        return events
    joined: list[Event] = []
    for event in events:
        last = joined[-1] if joined else None
        if isinstance(event, TextDelta) and isinstance(last, TextDelta):
            joined[-1] = TextDelta(last.text + event.text)
        elif isinstance(event, TokenIds | TextDelta) and isinstance(last, TokenIds):
            ids = event.token_ids if isinstance(event, TokenIds) else ()
            joined[-1] = TokenIds(last.token_ids + ids, last.text + event.text)
        elif isinstance(event, Reasoning) and isinstance(last, Reasoning):
            joined[-1] = Reasoning(last.text + event.text)
        elif (isinstance(event, ToolCallArgs) and isinstance(last, ToolCallArgs)
              and event.index == last.index):
            joined[-1] = ToolCallArgs(last.index, last.fragment + event.fragment)
        else:
            joined.append(event)
    return joined


def _decodes(state: AppState, out: TokenOutput) -> bool:
    """Whether the token's text belongs in the output (not an abort marker or the final EOS)."""
    if out.token_id < 0:
        return False
    return not (out.finish_reason == "stop" and out.token_id in state.eos_token_ids)


async def _engine_outputs(state: AppState, stream: AsyncIterator[list[TokenOutput]],
                          token_ids: list[int]) -> AsyncIterator[list[TokenOutput]]:
    """The engine's outputs; its errors become API errors (a stream ends with an error event).
    A refusal comes before the first token from a running engine (400); anything else is the
    engine failing the request (503)."""
    try:
        async for out in stream:
            yield out
    except EngineFailed as e:
        retry = RETRY_AFTER_S if state.engine_status == "restarting" else None
        raise ApiError(503, str(e), retry_after_s=retry) from None
    except EngineRejected as e:
        if not token_ids and state.engine_healthy:
            raise ApiError(400, f"The engine rejected the request: {e}") from None
        raise ApiError(503, f"The engine failed the request: {e}") from None


async def _close(stream: AsyncIterator[list[TokenOutput]]) -> None:
    """Close the engine stream, even while being cancelled: closing an unfinished stream aborts
    its request in the engine (a finished one is closed already, so this is then a no-op)."""
    with anyio.CancelScope(shield=True):
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def generate_choices(state: AppState, jobs: list[GenerationJob]
                           ) -> AsyncIterator[tuple[int, Event]]:
    """Run the jobs at once (n choices); yields (choice index, event) as they come. Closing
    this closes every choice's generation (aborting those still running)."""
    if len(jobs) == 1:
        async with aclosing(generate(state, jobs[0])) as events:
            async for event in events:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, job: GenerationJob) -> None:
        try:
            async with aclosing(generate(state, job)) as events:
                async for event in events:
                    await queue.put((index, event))
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put((index, e))
        await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        running = len(jobs)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Collected:
    """A whole (non-streamed) generation."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    logprobs: list[TokenDelta] = field(default_factory=list)  # when the job asked for them
    finished: Finished | None = None
    calls_at: int | None = None  # len(text) when the first call began

    def text_around_calls(self) -> tuple[str, str]:
        """The text written before the first call, and after it (as a stream sends them)."""
        at = len(self.text) if self.calls_at is None else self.calls_at
        return self.text[:at], self.text[at:]

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.text += event.text
        elif isinstance(event, Reasoning):
            self.reasoning += event.text
        elif isinstance(event, ToolCallStart) and self.calls_at is None:
            self.calls_at = len(self.text)
        elif isinstance(event, ToolCallEnd):
            self.tool_calls.append(event.call)
        elif isinstance(event, TokenDelta):
            self.logprobs.append(event)
        elif isinstance(event, Finished):
            self.finished = event


async def collect(request: Request, state: AppState, jobs: list[GenerationJob]) -> list[Collected]:
    """Each job's whole generation; if the client disconnects first, cancel (which aborts in
    the engine)."""
    results = [Collected() for _ in jobs]
    with anyio.CancelScope() as scope:
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, scope))
        try:
            async with aclosing(generate_choices(state, jobs)) as events:
                async for index, event in events:
                    results[index].add(event)
        finally:
            watcher.cancel()
    if any(r.finished is None for r in results):
        raise ApiError(499, "Client disconnected")
    return results


async def _cancel_on_disconnect(request: Request, scope: anyio.CancelScope) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
