"""One request through the engine: token ids in, API-neutral events out.

Pipeline per token: incremental detokenizer -> stop strings -> tool-call parser. Also records the
request for /stats and the latency histograms, and aborts the request in the engine whenever the
consumer goes away (client disconnect, stop string, server shutdown).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request

from appliance.engine.client import EngineFailed, EngineRejected
from appliance.engine.protocol import Constraint, GenerateRequest, TokenLogprobs, TokenOutput
from appliance.server.detokenize import IncrementalDetokenizer
from appliance.server.errors import ApiError
from appliance.server.state import AppState
from appliance.server.stop_strings import StopStringMatcher
from appliance.server.tool_calls import ParsedToolCall, ToolCallParser


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


@dataclass(frozen=True)
class GenerationJob:
    prompt_ids: list[int]
    sampling: SamplingOptions
    parse_tools: bool = False
    session: str = ""
    user: str = ""
    arrived_at: float | None = None  # monotonic time the HTTP request arrived (TTFT starts there)
    token_events: bool = False  # also yield a TokenDelta per generated token


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class TokenDelta:
    """One generated token id, ahead of its text: for jobs with `token_events`, and with its
    log-probabilities for jobs that asked for them (then not for a final end of sequence)."""

    token_id: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    call: ParsedToolCall


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of sequence) | "length" | "stop_sequence" | "abort"
    prompt_tokens: int
    completion_tokens: int
    num_tool_calls: int = 0
    stop_sequence: str | None = None
    token_ids: tuple[int, ...] = ()  # every generated token id, in order


Event = TextDelta | TokenDelta | ToolCallDelta | Finished


class OutputPipeline:
    """Detokenize, cut at stop strings, split out tool calls."""

    def __init__(self, tokenizer: Any, job: GenerationJob) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, job.prompt_ids)
        self._stops = StopStringMatcher(job.sampling.stop)
        self._tools = ToolCallParser() if job.parse_tools else None
        self._calls_emitted = 0

    @property
    def num_tool_calls(self) -> int:
        return self._tools.num_calls if self._tools else 0

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
        return self._route(emit) + self._finish_tools(), matched

    def _route(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._tools is None:
            return [TextDelta(text)]
        return self._events(self._tools.feed(text))

    def _finish_tools(self) -> list[Event]:
        return self._events(self._tools.finish()) if self._tools else []

    def _events(self, pieces: list[str | ParsedToolCall]) -> list[Event]:
        events: list[Event] = []
        for piece in pieces:
            if isinstance(piece, str):
                events.append(TextDelta(piece))
            else:
                events.append(ToolCallDelta(self._calls_emitted, piece))
                self._calls_emitted += 1
        return events


def engine_request(rid: int, job: GenerationJob) -> GenerateRequest:
    sampling = job.sampling
    return GenerateRequest(
        rid=rid, prompt_ids=list(job.prompt_ids), max_new_tokens=sampling.max_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        seed=sampling.seed, ignore_eos=sampling.ignore_eos, session=job.session, user=job.user,
        constraint=sampling.constraint, logit_bias=dict(sampling.logit_bias),
        repetition_penalty=sampling.repetition_penalty, presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty, min_tokens=sampling.min_tokens,
        logprobs=sampling.logprobs)


async def generate(state: AppState, job: GenerationJob) -> AsyncIterator[Event]:
    """Run `job` in the engine; yields text/tool-call deltas and exactly one final `Finished`."""
    client = state.client
    rid = client.new_rid()
    tracked = state.tracker.start(rid, job.user, len(job.prompt_ids), job.arrived_at)
    pipeline = OutputPipeline(state.tokenizer, job)
    stream = client.generate(engine_request(rid, job))
    token_ids: list[int] = []
    try:
        async for out in _engine_outputs(state, stream, token_ids):
            decodes = _decodes(state, out)
            if out.token_id >= 0:
                token_ids.append(out.token_id)
                state.metrics.observe(*state.tracker.on_token(tracked))
                logprobs = out.logprobs if decodes else None
                if job.token_events or logprobs is not None:
                    yield TokenDelta(out.token_id, logprobs)
            last = out.finish_reason is not None
            events, matched = pipeline.push(out.token_id, last, decodes)
            for item in events:
                yield item
            if matched is not None or last:
                if matched is not None:
                    await _close(stream)  # aborts the request in the engine (INTERFACES §4)
                reason = "stop_sequence" if matched is not None else str(out.finish_reason)
                yield Finished(reason, len(job.prompt_ids), len(token_ids),
                               pipeline.num_tool_calls, matched, tuple(token_ids))
                return
        raise ApiError(503, "The engine stopped before the request finished")
    finally:
        state.tracker.finish(rid)
        await _close(stream)


def _decodes(state: AppState, out: TokenOutput) -> bool:
    """Whether the token's text belongs in the output (not an abort marker or the final EOS)."""
    if out.token_id < 0:
        return False
    return not (out.finish_reason == "stop" and out.token_id in state.eos_token_ids)


async def _engine_outputs(state: AppState, stream: AsyncIterator[TokenOutput],
                          token_ids: list[int]) -> AsyncIterator[TokenOutput]:
    """The engine's outputs; its errors become API errors (a stream ends with an error event).
    A refusal comes before the first token from a running engine (400); anything else is the
    engine failing the request (503)."""
    try:
        async for out in stream:
            yield out
    except EngineFailed as e:
        raise ApiError(503, str(e)) from None
    except EngineRejected as e:
        if not token_ids and state.engine_healthy:
            raise ApiError(400, f"The engine rejected the request: {e}") from None
        raise ApiError(503, f"The engine failed the request: {e}") from None


async def _close(stream: AsyncIterator[TokenOutput]) -> None:
    """Close the engine stream, even while being cancelled: closing an unfinished stream aborts
    its request in the engine (a finished one is closed already, so this is then a no-op)."""
    with anyio.CancelScope(shield=True):
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass(frozen=True)
class Collected:
    """A whole (non-streamed) generation."""

    text: str
    tool_calls: list[ParsedToolCall]
    finished: Finished
    logprobs: list[TokenDelta]  # the tokens' log-probabilities, when the job asked for them


async def collect(request: Request, events: AsyncIterator[Event]) -> Collected:
    """Drain `events`; if the client disconnects first, cancel (which aborts in the engine)."""
    parts: list[str] = []
    calls: list[ParsedToolCall] = []
    logprobs: list[TokenDelta] = []
    finished: Finished | None = None
    with anyio.CancelScope() as scope:
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, scope))
        try:
            async with aclosing(events):
                async for item in events:
                    if isinstance(item, TextDelta):
                        parts.append(item.text)
                    elif isinstance(item, ToolCallDelta):
                        calls.append(item.call)
                    elif isinstance(item, TokenDelta) and item.logprobs is not None:
                        logprobs.append(item)
                    elif isinstance(item, Finished):
                        finished = item
        finally:
            watcher.cancel()
    if finished is None:
        raise ApiError(499, "Client disconnected")
    return Collected("".join(parts), calls, finished, logprobs)


async def _cancel_on_disconnect(request: Request, scope: anyio.CancelScope) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
