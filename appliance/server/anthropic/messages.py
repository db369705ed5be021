"""`POST /v1/messages` and `/v1/messages/count_tokens` (Anthropic Messages API)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from appliance.server import sse
from appliance.server.anthropic.protocol import CountTokensRequest, MessagesRequest
from appliance.server.anthropic.template import template_messages, template_tools
from appliance.server.auth import require_api_key
from appliance.server.errors import ApiError, anthropic_error_body
from appliance.server.generation import (Finished, GenerationJob, SamplingOptions, TextDelta, ToolCallDelta,
                                         collect, generate)
from appliance.server.json_body import JsonBodyRoute
from appliance.server.prompt import chat_prompt_ids, output_budget
from appliance.server.request_context import (arrival_time, check_model, embedded_session, session_hint,
                                              user_hint)
from appliance.server.state import AppState, get_state
from appliance.server.tool_calls import ParsedToolCall

router = APIRouter(route_class=JsonBodyRoute, dependencies=[Depends(require_api_key)])

STOP_REASONS = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens",
                "abort": "end_turn"}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    tools = template_tools(body)
    prefill = body.messages[-1].role == "assistant"  # Anthropic: the model continues that text
    prompt_ids = await chat_prompt_ids(state, template_messages(body), tools, continue_final=prefill)
    job = GenerationJob(prompt_ids, _sampling(body, len(prompt_ids), state.client.max_model_len),
                        parse_tools=tools is not None, session=_session(request, body),
                        user=user_hint(request, body.metadata.user_id if body.metadata else None),
                        arrived_at=arrival_time(request))
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        return sse.response(sse.guarded(_stream(state, job, message_id), _stream_error))
    result = await collect(request, generate(state, job))
    content = _content(result.text, result.tool_calls)
    return JSONResponse(_message(state, message_id, content, result.finished))


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    prompt_ids = await chat_prompt_ids(state, template_messages(body), template_tools(body),
                                       continue_final=body.messages[-1].role == "assistant")
    return JSONResponse({"input_tokens": len(prompt_ids)})


def _sampling(body: MessagesRequest, prompt_len: int, max_model_len: int) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=output_budget(prompt_len, body.max_tokens, max_model_len, param="max_tokens"),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        stop=tuple(body.stop_sequences or ()),
    )


def _session(request: Request, body: MessagesRequest) -> str:
    metadata = body.metadata
    if metadata is None:
        return session_hint(request)
    return session_hint(request, metadata.session_id, embedded_session(metadata.user_id))


def _stop_reason(finished: Finished) -> str:
    if finished.num_tool_calls and finished.reason in ("stop", "stop_sequence"):
        return "tool_use"
    return STOP_REASONS.get(finished.reason, "end_turn")


def _tool_use(call: ParsedToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name,
            "input": call.arguments}


def _content(text: str, calls: list[ParsedToolCall]) -> list[dict[str, Any]]:
    blocks = [{"type": "text", "text": text}] if (text or not calls) else []
    return blocks + [_tool_use(call) for call in calls]


def _usage(finished: Finished | None, prompt_tokens: int) -> dict[str, int]:
    return {"input_tokens": prompt_tokens, "output_tokens": finished.completion_tokens if finished else 0}


def _message(state: AppState, message_id: str, content: list[dict[str, Any]],
             finished: Finished | None, prompt_tokens: int = 0) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": state.model_name,
            "content": content,
            "stop_reason": _stop_reason(finished) if finished else None,
            "stop_sequence": finished.stop_sequence if finished else None,
            "usage": _usage(finished, finished.prompt_tokens if finished else prompt_tokens)}


class _BlockStream:
    """Anthropic's content-block events: opens a text block lazily, one block per tool call."""

    def __init__(self) -> None:
        self.index = -1
        self.text_open = False

    def text(self, text: str) -> list[str]:
        events = [] if self.text_open else self._open({"type": "text", "text": ""})
        self.text_open = True
        return events + [sse.event("content_block_delta", {
            "type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": text}})]

    def tool_use(self, call: ParsedToolCall) -> list[str]:
        block = _tool_use(call)
        events = self.close() + self._open({**block, "input": {}})
        events.append(sse.event("content_block_delta", {
            "type": "content_block_delta", "index": self.index,
            "delta": {"type": "input_json_delta", "partial_json": call.arguments_json}}))
        return events + self._stop()

    def finish(self) -> list[str]:
        """Close the open block; an output with no content still gets one empty text block."""
        if self.index < 0:
            self.text_open = True
            return self._open({"type": "text", "text": ""}) + self.close()
        return self.close()

    def close(self) -> list[str]:
        if not self.text_open:
            return []
        self.text_open = False
        return self._stop()

    def _open(self, block: dict[str, Any]) -> list[str]:
        self.index += 1
        return [sse.event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})]

    def _stop(self) -> list[str]:
        return [sse.event("content_block_stop", {"type": "content_block_stop", "index": self.index})]


async def _stream(state: AppState, job: GenerationJob, message_id: str) -> AsyncIterator[str]:
    start = _message(state, message_id, [], None, prompt_tokens=len(job.prompt_ids))
    yield sse.event("message_start", {"type": "message_start", "message": start})
    yield sse.event("ping", {"type": "ping"})
    blocks = _BlockStream()
    async for item in generate(state, job):
        if isinstance(item, TextDelta):
            events = blocks.text(item.text)
        elif isinstance(item, ToolCallDelta):
            events = blocks.tool_use(item.call)
        elif isinstance(item, Finished):
            events = blocks.finish() + _finish_events(item)
        else:
            continue
        for chunk in events:
            yield chunk


def _finish_events(finished: Finished) -> list[str]:
    delta = {"type": "message_delta",
             "delta": {"stop_reason": _stop_reason(finished), "stop_sequence": finished.stop_sequence},
             "usage": {"output_tokens": finished.completion_tokens}}
    return [sse.event("message_delta", delta), sse.event("message_stop", {"type": "message_stop"})]


def _stream_error(error: ApiError) -> str:
    return sse.event("error", anthropic_error_body(error.status, error.message))
