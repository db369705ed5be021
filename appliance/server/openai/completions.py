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
from appliance.server.generation import (Finished, GenerationJob, TextDelta, TokenDelta, collect,
                                         generate)
from appliance.server.json_body import JsonBodyRoute
from appliance.server.openai.common import (finish_reason, reject_unsupported, sampling_options,
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
                                vocab_size=state.vocab_size, logprobs=body.logprobs)
    # Streamed with return_token_ids: a chunk per token carrying its id (its text may still be
    # held back by the detokenizer), so clients can time every token.
    job = GenerationJob(prompt_ids, sampling, session=session_hint(request, body.session_id),
                        user=user_hint(request, body.user), arrived_at=arrival_time(request),
                        token_events=bool(body.stream and body.return_token_ids))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(state, job, head, include_usage, body.logprobs is not None)
        return sse.response(sse.guarded(stream, stream_error))
    result = await collect(request, generate(state, job))
    ids = list(result.finished.token_ids) if body.return_token_ids and result.finished else None
    choice = _choice(result.text, result.finished, ids)
    if body.logprobs is not None:
        logprobs = CompletionLogprobs(state.tokenizer)
        for item in result.logprobs:
            logprobs.add(item.token_id, item.logprobs)
        choice["logprobs"] = logprobs.take() or CompletionLogprobs.empty()
    return JSONResponse({**head, "choices": [choice], "usage": usage(result.finished)})


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


def _choice(text: str, finished: Finished | None, token_ids: list[int] | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None,
              "finish_reason": finish_reason(finished) if finished else None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


async def _stream(state: AppState, job: GenerationJob, head: dict[str, Any],
                  include_usage: bool, with_logprobs: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}
    logprobs = CompletionLogprobs(state.tokenizer)

    def chunk(choice: dict[str, Any]) -> str:
        if with_logprobs:  # the log-probabilities of the tokens since the last chunk
            choice["logprobs"] = logprobs.take()
        return sse.data({**head, "choices": [choice], **extra})

    async for item in generate(state, job):
        if isinstance(item, TokenDelta):
            if item.logprobs is not None:
                logprobs.add(item.token_id, item.logprobs)
            if job.token_events:
                yield chunk(_choice("", None, [item.token_id]))
        elif isinstance(item, TextDelta):
            yield chunk(_choice(item.text, None))
        elif isinstance(item, Finished):
            yield chunk(_choice("", item))
            if include_usage:
                yield sse.data({**head, "choices": [], "usage": usage(item)})
    yield sse.DONE

