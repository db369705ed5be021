"""`POST /v1/completions` (OpenAI legacy Completions: a prompt string or token ids, one choice)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from appliance.server import sse
from appliance.server.auth import require_api_key
from appliance.server.errors import bad_request
from appliance.server.generation import (Finished, GenerationJob, TextDelta, TokenDelta, TokenIds, collect,
                                         generate_choices, require_engine)
from appliance.server.json_body import JsonBodyRoute
from appliance.server.openai.common import (choice_jobs, finish_reason, reject_unsupported, sampling_options,
                                             stream_error, usage)
from appliance.server.openai.logprobs import CompletionLogprobs
from appliance.server.openai.protocol import CompletionRequest
from appliance.server.prompt import check_token_ids, text_prompt_ids
from appliance.server.request_context import arrival_time, check_model, session_hint, user_hint
from appliance.server.state import AppState, get_state

router = APIRouter(route_class=JsonBodyRoute, dependencies=[Depends(require_api_key)])

DEFAULT_MAX_TOKENS = 16  # the OpenAI Completions default when max_tokens is absent


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    _reject_unsupported(body)
    prompt_ids = await _prompt_ids(state, body.prompt)
    requested = body.max_tokens if body.max_tokens is not None else min(
        DEFAULT_MAX_TOKENS, max(1, state.client.max_model_len - len(prompt_ids)))
    sampling = sampling_options(body, len(prompt_ids), state.client.max_model_len, requested, "max_tokens",
                                vocab_size=state.vocab_size, defaults=state.sampling_defaults,
                                logprobs=body.logprobs)
    # Streamed with return_token_ids: every token's id in a chunk as it arrives (its text may
    # still be held back by the detokenizer), so clients can time every token.
    job = GenerationJob(prompt_ids, sampling, session=session_hint(request, body.session_id),
                        user=user_hint(request, body.user), arrived_at=arrival_time(request),
                        token_events=bool(body.stream and body.return_token_ids))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    jobs = choice_jobs(job, body.n)
    require_engine(state)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(state, jobs, head, include_usage, body.logprobs is not None)
        return sse.response(sse.guarded(stream, stream_error))
    results = await collect(request, state, jobs)
    choices = []
    for i, r in enumerate(results):
        choice = _choice(i, r.text, r.finished, list(r.finished.token_ids) if body.return_token_ids else None)
        if body.logprobs is not None:
            logprobs = CompletionLogprobs(state.tokenizer)
            for item in r.logprobs:
                logprobs.add(item.token_id, item.logprobs)
            choice["logprobs"] = logprobs.take() or CompletionLogprobs.empty()
        choices.append(choice)
    return JSONResponse({**head, "choices": choices, "usage": usage([r.finished for r in results])})


def _reject_unsupported(body: CompletionRequest) -> None:
    reject_unsupported(body)
    if body.echo:
        raise bad_request("echo is not supported by this server", "echo")
    if body.best_of not in (None, 1):
        raise bad_request("Only best_of=1 is supported", "best_of")
    if body.suffix:
        raise bad_request("suffix is not supported by this server", "suffix")


async def _prompt_ids(state: AppState, prompt: str | list[str] | list[int] | list[list[int]]) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = await text_prompt_ids(state, prompt)
    elif all(isinstance(t, int) for t in prompt):
        ids = [int(t) for t in prompt]  # type: ignore[arg-type]
    else:
        raise bad_request("Only one prompt per request is supported", "prompt")
    return check_token_ids(ids, state.vocab_size)


def _choice(index: int, text: str, finished: Finished | None, token_ids: list[int] | None = None) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": None,
              "finish_reason": finish_reason(finished) if finished else None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


async def _stream(state: AppState, jobs: list[GenerationJob], head: dict[str, Any],
                  include_usage: bool, with_logprobs: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}
    logprobs = [CompletionLogprobs(state.tokenizer) for _ in jobs]
    finished: dict[int, Finished] = {}

    def chunk(index: int, choice: dict[str, Any]) -> str:
        if with_logprobs:  # the log-probabilities of the choice's tokens since its last chunk
            choice["logprobs"] = logprobs[index].take()
        return sse.data({**head, "choices": [choice], **extra})

    async for index, item in generate_choices(state, jobs):
        if isinstance(item, TokenDelta):
            logprobs[index].add(item.token_id, item.logprobs)
            if jobs[index].token_events:
                yield chunk(index, _choice(index, item.text, None, [item.token_id]))
        elif isinstance(item, TokenIds):
            yield chunk(index, _choice(index, item.text, None, list(item.token_ids)))
        elif isinstance(item, TextDelta):
            yield chunk(index, _choice(index, item.text, None))
        elif isinstance(item, Finished):
            finished[index] = item
            yield chunk(index, _choice(index, "", item))
    if include_usage:
        yield sse.data({**head, "choices": [], "usage": usage([finished[i] for i in sorted(finished)])})
    yield sse.DONE
