"""A test double of `appliance.engine.client.EngineClient` (INTERFACES §4) that emits scripted tokens.

It behaves like the engine where the frontend can tell: it stops on a stop token id (emitting it
with finish_reason "stop"), stops at max_new_tokens with "length", raises EngineRejected before
the first token when told to, fails a stream part-way when told to (raising `failure`, or ending
without a finish reason), records aborts (closing the stream early counts as one) and keeps
engine-like totals for stats(). Like the engine's prefix cache, it reuses every full page of an
earlier request's tokens that a new prompt starts with (all but the prompt's last token), and
reports that on the request's first output (`cached_tokens`).
"""

from __future__ import annotations

import asyncio
import itertools
from contextlib import aclosing
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from appliance.engine.client import EngineRejected
from appliance.engine.protocol import GenerateRequest, RequestProgress, TokenLogprobs, TokenOutput

EOS_ID = 2  # the tiny tokenizer's <|im_end|>
PAGE_SIZE = 16


async def _sleep_at_least(seconds: float) -> None:
    """asyncio.sleep, but never shorter on time.monotonic (the server's tracker clock): event
    loop timers may fire up to a clock tick early (uvloop: ~1 ms), which made a 2 x 50 ms
    inter-token sum read 99.6 ms."""
    deadline = time.monotonic() + seconds
    await asyncio.sleep(seconds)          # always yields to the loop, as before (also at 0)
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(left)


def _logprobs(token: int, index: int, k: int | None) -> TokenLogprobs | None:
    """Made-up but well-formed values: the sampled token is the most probable alternative."""
    if k is None:
        return None
    logprob = -0.1 * (index + 1)
    return TokenLogprobs(logprob, [token + j for j in range(k)], [logprob - j for j in range(k)])


@dataclass
class EngineInfo:
    vocab_size: int
    eos_token_ids: tuple[int, ...] = (EOS_ID,)
    devices: tuple[str, ...] = ()  # a CPU engine


@dataclass
class FakeEngineClient:
    tokenizer: Any
    max_model_len: int = 4096
    reply: str = "Hello from the fake engine."
    delay_s: float = 0.0  # before each token
    batch_size: int = 1  # outputs handed over together (as when the frontend falls behind)
    reject: str | None = None
    fail_after: int | None = None  # after this many tokens: raise `failure`, or end the stream if None
    abort_after: int | None = None  # after this many tokens the engine aborts the request (shutdown)
    failure: Exception | None = None
    healthy: bool = True
    requests: list[GenerateRequest] = field(default_factory=list)
    aborted: set[int] = field(default_factory=set)
    abort_messages: list[int] = field(default_factory=list)  # one entry per abort sent to the engine
    running: set[int] = field(default_factory=set)
    scripts: list[str] = field(default_factory=list)  # replies for the next requests, in order
    seen: list[list[int]] = field(default_factory=list)  # token sequences in the "prefix cache"
    progress: dict[int, RequestProgress] = field(default_factory=dict)  # of the running ones
    info: EngineInfo = field(init=False)
    totals: dict[str, int] = field(default_factory=lambda: {
        "prompt_tokens_total": 0, "generation_tokens_total": 0, "prefix_cache_hit_tokens_total": 0,
        "preemptions_total": 0, "spec_draft_tokens_total": 0, "spec_accepted_tokens_total": 0,
        "spec_verify_rows_total": 0})

    def __post_init__(self) -> None:
        self._rids = itertools.count(1)
        self.info = EngineInfo(vocab_size=len(self.tokenizer))

    def reset(self) -> None:
        self.reply, self.delay_s, self.reject = "Hello from the fake engine.", 0.0, None
        self.batch_size = 1
        self.fail_after, self.failure, self.abort_after = None, None, None
        self.scripts.clear()
        self.seen.clear()
        self.requests.clear()
        self.aborted.clear()
        self.abort_messages.clear()

    def new_rid(self) -> int:
        return next(self._rids)

    def script(self) -> list[int]:
        reply = self.scripts.pop(0) if self.scripts else self.reply
        return list(self.tokenizer.encode(reply, add_special_tokens=False)) + [EOS_ID]

    def _cached_tokens(self, prompt: list[int]) -> int:
        """Full pages of the prompt (but its last token) an earlier sequence starts with."""
        best = 0
        for seq in self.seen:
            n = 0
            while n < min(len(seq), len(prompt) - 1) and seq[n] == prompt[n]:
                n += 1
            best = max(best, n)
        return best // PAGE_SIZE * PAGE_SIZE

    async def generate(self, req: GenerateRequest) -> AsyncIterator[list[TokenOutput]]:
        """The outputs in batches of `batch_size` (the last one maybe shorter), as the client
        hands them over when its consumer fell behind (or a speculative step's tokens)."""
        batch: list[TokenOutput] = []
        async with aclosing(self._outputs(req)) as outputs:
            try:
                async for out in outputs:
                    batch.append(out)
                    if len(batch) == self.batch_size or out.finish_reason is not None:
                        yield batch
                        batch = []
            except Exception:
                if batch:  # the outputs that came before the error first
                    yield batch
                raise
            if batch:  # the stream ended without a finish reason
                yield batch

    async def _outputs(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        self.requests.append(req)
        if self.reject is not None:
            raise EngineRejected(self.reject)
        self.running.add(req.rid)
        self.totals["prompt_tokens_total"] += len(req.prompt_ids)
        cached = self._cached_tokens(req.prompt_ids)
        self.totals["prefix_cache_hit_tokens_total"] += cached
        tokens = self._tokens(req)
        self.seen.append(list(req.prompt_ids) + tokens[:-1])
        context = len(req.prompt_ids)
        self.progress[req.rid] = RequestProgress(req.rid, "decoding", context, 0, context)
        finished = False
        try:
            for i, token in enumerate(tokens):
                await _sleep_at_least(self.delay_s)
                if self.fail_after is not None and i >= self.fail_after:
                    if self.failure is None:
                        return  # the stream ends without a finish reason
                    finished = True  # like the client: the error ended the request, no abort
                    raise self.failure
                if req.rid in self.aborted or i == self.abort_after:  # an abort ends the stream
                    finished = True
                    yield TokenOutput(req.rid, -1, "abort")
                    return
                self.totals["generation_tokens_total"] += 1
                context += 1
                self.progress[req.rid] = RequestProgress(req.rid, "decoding", context, 0, context)
                reason = self._finish_reason(req, token, i)
                finished = reason is not None
                yield TokenOutput(req.rid, token, reason, _logprobs(token, i, req.logprobs),
                                  cached if i == 0 else None)
                if finished:
                    return
        finally:
            self.running.discard(req.rid)
            self.progress.pop(req.rid, None)
            if not finished:
                self._record_abort(req.rid)

    def _tokens(self, req: GenerateRequest) -> list[int]:
        tokens = self.script()
        if req.ignore_eos:  # keep going with filler text
            filler = self.tokenizer.encode(" more", add_special_tokens=False)
            tokens = [t for t in tokens if t != EOS_ID] + filler * req.max_new_tokens
        return tokens[:req.max_new_tokens]

    def _finish_reason(self, req: GenerateRequest, token: int, index: int) -> str | None:
        if token in req.stop_token_ids or (token in self.info.eos_token_ids and not req.ignore_eos):
            return "stop"
        return "length" if index + 1 >= req.max_new_tokens else None

    async def abort(self, rid: int) -> None:
        self._record_abort(rid)

    def _record_abort(self, rid: int) -> None:
        self.aborted.add(rid)
        self.abort_messages.append(rid)

    def request_progress(self) -> dict[int, RequestProgress]:
        return self.progress

    def stats(self) -> dict[str, float]:
        return {"page_size": 16, "pages_total": 512, "pages_used": 40 + len(self.running),
                "pages_cached": 24, "pages_free": 448 - len(self.running),
                "requests_running": len(self.running), "requests_waiting": 1, **self.totals,
                "steps_total": 7}
