"""`POST /v1/chat/completions` (OpenAI Chat Completions, streamed or not, with tool calls)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from appliance.server import sse
from appliance.server.auth import require_api_key
from appliance.server.errors import bad_request
from appliance.server.generation import (Finished, GenerationJob, TextDelta, TokenDelta, ToolCallDelta,
                                         collect, generate)
from appliance.server.json_body import JsonBodyRoute
from appliance.server.openai.common import (finish_reason, reject_unsupported, sampling_options,
                                             stream_error, usage)
from appliance.server.openai.logprobs import ChatLogprobs
from appliance.server.openai.protocol import ChatCompletionRequest
from appliance.server.openai.template import template_messages, template_tools
from appliance.server.prompt import chat_prompt_ids
from appliance.server.request_context import arrival_time, check_model, session_hint, user_hint
from appliance.server.state import AppState, get_state
from appliance.server.tool_calls import ParsedToolCall

router = APIRouter(route_class=JsonBodyRoute, dependencies=[Depends(require_api_key)])


@dataclass(frozen=True)
class ChatIds:
    id: str
    created: int
    model: str


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    _reject_unsupported(body)
    tools = template_tools(body.tools, body.tool_choice)
    prompt_ids = await chat_prompt_ids(state, template_messages(body.messages), tools,
                                       body.chat_template_kwargs)
    requested, param = ((body.max_completion_tokens, "max_completion_tokens")
                        if body.max_completion_tokens is not None else (body.max_tokens, "max_tokens"))
    sampling = sampling_options(body, len(prompt_ids), state.client.max_model_len, requested, param,
                                vocab_size=state.vocab_size,
                                logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    job = GenerationJob(prompt_ids, sampling, parse_tools=tools is not None,
                        session=session_hint(request, body.session_id), user=user_hint(request, body.user),
                        arrived_at=arrival_time(request))
    ids = ChatIds(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.response(sse.guarded(_stream(state, job, ids, include_usage), stream_error))
    result = await collect(request, generate(state, job))
    logprobs = ChatLogprobs(state.tokenizer)
    for item in result.logprobs:
        logprobs.add(item.token_id, item.logprobs)
    return JSONResponse(_completion(ids, result.text, result.tool_calls, result.finished,
                                    (logprobs.take() or {"content": []}) if body.logprobs else None))


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    reject_unsupported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    kind = (body.response_format or {}).get("type", "text")
    if kind != "text":
        raise bad_request(f"response_format {kind!r} is not supported (only 'text')", "response_format")


def _completion(ids: ChatIds, text: str, calls: list[ParsedToolCall], finished: Finished,
                logprobs: dict[str, Any] | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text if (text or not calls) else None}
    if calls:
        message["tool_calls"] = [_tool_call(call) for call in calls]
    return {"id": ids.id, "object": "chat.completion", "created": ids.created, "model": ids.model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": logprobs,
                         "finish_reason": finish_reason(finished)}],
            "usage": usage(finished)}


def _tool_call(call: ParsedToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments_json}}
    if index is not None:
        out = {"index": index, **out}
    return out


async def _stream(state: AppState, job: GenerationJob, ids: ChatIds, include_usage: bool) -> AsyncIterator[str]:
    logprobs = ChatLogprobs(state.tokenizer)

    def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
        # each chunk carries the log-probabilities of the tokens since the last one
        body: dict[str, Any] = {"id": ids.id, "object": "chat.completion.chunk", "created": ids.created,
                                "model": ids.model, "choices": [{"index": 0, "delta": delta,
                                                                 "logprobs": logprobs.take(),
                                                                 "finish_reason": reason}]}
        if include_usage:
            body["usage"] = None
        return sse.data(body)

    yield chunk({"role": "assistant", "content": ""})
    async for item in generate(state, job):
        if isinstance(item, Finished):
            yield chunk({}, finish_reason(item))
            if include_usage:
                yield sse.data({"id": ids.id, "object": "chat.completion.chunk", "created": ids.created,
                                "model": ids.model, "choices": [], "usage": usage(item)})
        elif isinstance(item, (TextDelta, ToolCallDelta)):
            yield chunk(_delta(item))
        elif isinstance(item, TokenDelta) and item.logprobs is not None:
            logprobs.add(item.token_id, item.logprobs)
    yield sse.DONE


def _delta(item: TextDelta | ToolCallDelta) -> dict[str, Any]:
    if isinstance(item, ToolCallDelta):
        return {"tool_calls": [_tool_call(item.call, item.index)]}
    return {"content": item.text}

