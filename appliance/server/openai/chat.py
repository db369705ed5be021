"""`POST /v1/chat/completions` (OpenAI Chat Completions, streamed or not, with tool calls,
enforced tool_choice / response_format, and n choices)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from appliance.server import sse
from appliance.server.auth import require_api_key
from appliance.server.constraints import ResponseFormat, checked, request_constraint
from appliance.server.errors import bad_request
from appliance.server.generation import (Collected, Finished, GenerationJob, TextDelta, TokenDelta, collect,
                                         generate_choices, require_engine)
from appliance.server.json_body import JsonBodyRoute
from appliance.server.openai.common import (choice_jobs, finish_reason, merged_constraint, reject_unsupported,
                                             sampling_options, stream_error, tool_setup, usage)
from appliance.server.openai.logprobs import ChatLogprobs
from appliance.server.openai.protocol import ChatCompletionRequest
from appliance.server.openai.template import template_messages, template_tools
from appliance.server.prompt import chat_prompt_ids
from appliance.server.request_context import arrival_time, check_model, session_hint, user_hint
from appliance.server.state import AppState, get_state
from appliance.server.tool_parsers import ParsedToolCall, Reasoning, ToolCallArgs, ToolCallStart

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
    template = template_tools(body.tools, body.tool_choice)
    tools, choice = tool_setup(body.tools, body.tool_choice)
    prompt_ids = await chat_prompt_ids(state, template_messages(body.messages), template,
                                       body.chat_template_kwargs)
    requested, param = ((body.max_completion_tokens, "max_completion_tokens")
                        if body.max_completion_tokens is not None else (body.max_tokens, "max_tokens"))
    sampling = sampling_options(body, len(prompt_ids), state.client.max_model_len, requested, param,
                                vocab_size=state.vocab_size, defaults=state.sampling_defaults,
                                logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    constraint = request_constraint(state.tool_format, tools, choice, body.parallel_tool_calls is not False,
                                    _response_format(body.response_format))
    constraint = await checked(state, constraint, _constraint_param(body))
    sampling = replace(sampling, constraint=merged_constraint(sampling.constraint, constraint))
    job = GenerationJob.chat_reply(prompt_ids, sampling, tools, choice,
                                   session=session_hint(request, body.session_id),
                                   user=user_hint(request, body.user), arrived_at=arrival_time(request))
    jobs = choice_jobs(job, body.n)
    ids = ChatIds(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name)
    require_engine(state)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.response(sse.guarded(_stream(state, jobs, ids, include_usage), stream_error))
    results = await collect(request, state, jobs)
    return JSONResponse(_completion(state, ids, results, bool(body.logprobs)))


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    reject_unsupported(body)
    for legacy, current in (("functions", "tools"), ("function_call", "tool_choice")):
        if getattr(body, legacy) is not None:  # ignored, a forced call would never come
            raise bad_request(f"{legacy} is OpenAI's deprecated form of {current}; send {current}",
                              legacy)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")


def _response_format(value: dict[str, Any] | None) -> ResponseFormat:
    """OpenAI's `response_format`: text, json_object, or json_schema with `json_schema.schema`."""
    kind = "text" if value is None else value.get("type")
    if kind is None:
        raise bad_request("response_format needs a type: text, json_object or json_schema",
                          "response_format.type")
    if kind in ("text", "json_object"):
        return ResponseFormat(kind)
    if kind != "json_schema":
        raise bad_request(f"response_format type {kind!r} is not one of text, json_object, json_schema",
                          "response_format.type")
    wrapper = (value or {}).get("json_schema")
    if wrapper is not None and not isinstance(wrapper, dict):
        raise bad_request("response_format json_schema must be an object holding the JSON schema "
                          "in json_schema.schema", "response_format.json_schema")
    schema = (wrapper or {}).get("schema")
    if not isinstance(schema, dict):
        raise bad_request("response_format json_schema needs a JSON schema object in json_schema.schema",
                          "response_format.json_schema.schema")
    return ResponseFormat("json_schema", schema)


def _constraint_param(body: ChatCompletionRequest) -> str:
    """The field a constraint that cannot be compiled comes from."""
    return "response_format" if body.response_format and not body.tools else "tools"


def _completion(state: AppState, ids: ChatIds, results: list[Collected], logprobs: bool) -> dict[str, Any]:
    choices = [{"index": i, "message": _message(r),
                "logprobs": _logprobs(state, r) if logprobs else None,
                "finish_reason": finish_reason(r.finished)} for i, r in enumerate(results)]
    return {"id": ids.id, "object": "chat.completion", "created": ids.created, "model": ids.model,
            "choices": choices, "usage": usage([r.finished for r in results])}


def _message(result: Collected) -> dict[str, Any]:
    calls = result.tool_calls
    message: dict[str, Any] = {"role": "assistant", "content": result.text if (result.text or not calls) else None}
    if result.reasoning:
        message["reasoning_content"] = result.reasoning
    if calls:
        message["tool_calls"] = [_tool_call(call) for call in calls]
    return message


def _logprobs(state: AppState, result: Collected) -> dict[str, Any]:
    logprobs = ChatLogprobs(state.tokenizer)
    for item in result.logprobs:
        logprobs.add(item.token_id, item.logprobs)
    return logprobs.take() or {"content": []}


def _tool_call(call: ParsedToolCall) -> dict[str, Any]:
    return {"id": _call_id(), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json}}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


async def _stream(state: AppState, jobs: list[GenerationJob], ids: ChatIds,
                  include_usage: bool) -> AsyncIterator[str]:
    logprobs = [ChatLogprobs(state.tokenizer) for _ in jobs]

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None) -> str:
        # each chunk carries the log-probabilities of its choice's tokens since the last one
        body: dict[str, Any] = {"id": ids.id, "object": "chat.completion.chunk", "created": ids.created,
                                "model": ids.model, "choices": [{"index": index, "delta": delta,
                                                                 "logprobs": logprobs[index].take(),
                                                                 "finish_reason": reason}]}
        if include_usage:
            body["usage"] = None
        return sse.data(body)

    for index in range(len(jobs)):
        yield chunk(index, {"role": "assistant", "content": ""})
    finished: dict[int, Finished] = {}
    async for index, item in generate_choices(state, jobs):
        if isinstance(item, Finished):
            finished[index] = item
            yield chunk(index, {}, finish_reason(item))
        elif isinstance(item, TokenDelta):
            logprobs[index].add(item.token_id, item.logprobs)
        elif (delta := _delta(item)) is not None:
            yield chunk(index, delta)
    if include_usage:
        yield sse.data({"id": ids.id, "object": "chat.completion.chunk", "created": ids.created,
                        "model": ids.model, "choices": [],
                        "usage": usage([finished[i] for i in sorted(finished)])})
    yield sse.DONE


def _delta(item: object) -> dict[str, Any] | None:
    if isinstance(item, TextDelta):
        return {"content": item.text}
    if isinstance(item, Reasoning):
        return {"reasoning_content": item.text}
    if isinstance(item, ToolCallStart):
        return {"tool_calls": [{"index": item.index, "id": _call_id(), "type": "function",
                                "function": {"name": item.name, "arguments": ""}}]}
    if isinstance(item, ToolCallArgs):
        return {"tool_calls": [{"index": item.index, "function": {"arguments": item.fragment}}]}
    return None
