"""`POST /v1/messages` and `/v1/messages/count_tokens` (Anthropic Messages API)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from appliance.engine.sampling_defaults import SamplingDefaults
from appliance.server import sse
from appliance.server.anthropic.protocol import CountTokensRequest, MessagesRequest
from appliance.server.anthropic.template import template_messages, template_tools, tool_setup
from appliance.server.auth import require_api_key
from appliance.server.constraints import checked, request_constraint
from appliance.server.errors import ApiError, anthropic_error_body, bad_request
from appliance.server.generation import (Collected, Finished, GenerationJob, Prefilled, SamplingOptions,
                                         TextDelta, collect, generate_choices,
                                         require_engine)
from appliance.server.json_body import JsonBodyRoute
from appliance.server.prompt import chat_prompt_ids
from appliance.server.request_context import (arrival_time, check_model, claude_code_ids,
                                              session_hint, user_hint)
from appliance.server.state import AppState, get_state
from appliance.server.tool_parsers import Reasoning, ToolCallArgs, ToolCallEnd, ToolCallStart

router = APIRouter(route_class=JsonBodyRoute, dependencies=[Depends(require_api_key)])

STOP_REASONS = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens"}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    template = template_tools(body)
    tools, choice, parallel = tool_setup(body)
    prefill = body.messages[-1].role == "assistant"  # Anthropic: the model continues that text
    prompt_ids = await chat_prompt_ids(state, template_messages(body), template, continue_final=prefill)
    constraint = await checked(state, request_constraint(state.tool_format, tools, choice, parallel), "tools")
    sampling = replace(_sampling(body, len(prompt_ids), state.client.max_model_len, state.sampling_defaults),
                       constraint=constraint)
    job = GenerationJob.chat_reply(prompt_ids, sampling, tools, choice,
                                   session=_session(request, body),
                                   user=user_hint(request, claude_code_ids(_user_id(body))[0]),
                                   arrived_at=arrival_time(request))
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    require_engine(state)
    if body.stream:
        return sse.response(sse.guarded(_stream(state, job, message_id), _stream_error))
    (result,) = await collect(request, state, [job])
    return JSONResponse(_message(state, message_id, _content(result), _checked(result.finished)))


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    prompt_ids = await chat_prompt_ids(state, template_messages(body), template_tools(body),
                                       continue_final=body.messages[-1].role == "assistant")
    return JSONResponse({"input_tokens": len(prompt_ids)})


def _sampling(body: MessagesRequest, prompt_len: int, max_model_len: int,
              defaults: SamplingDefaults) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=output_budget(prompt_len, body.max_tokens, max_model_len),
        **defaults.fill(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
        stop=tuple(body.stop_sequences or ()),
        speculative=body.speculative,
    )


def output_budget(prompt_len: int, max_tokens: int, max_model_len: int) -> int:
    """`max_tokens`, or a 400 in Anthropic's wording (which clients such as Claude Code parse
    to shorten the prompt or lower max_tokens) when the context cannot hold it."""
    if prompt_len >= max_model_len:
        raise bad_request(f"prompt is too long: {prompt_len} tokens > {max_model_len - 1} maximum", "messages")
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(f"input length and `max_tokens` exceed context limit: {prompt_len} + {max_tokens} "
                          f"> {max_model_len}, decrease input length or `max_tokens` and try again",
                          "max_tokens")
    return max_tokens


def _session(request: Request, body: MessagesRequest) -> str:
    metadata = body.metadata
    if metadata is None:
        return session_hint(request)
    return session_hint(request, metadata.session_id, claude_code_ids(metadata.user_id)[1])


def _user_id(body: MessagesRequest) -> str | None:
    return body.metadata.user_id if body.metadata else None


def _checked(finished: Finished | None) -> Finished:
    """The generation's end; an engine abort (the server shutting down) is an error, never a
    reply that looks complete."""
    if finished is None or finished.reason == "abort":
        raise ApiError(503, "The request was aborted before it finished (the server is shutting down)")
    return finished


def _stop_reason(finished: Finished, content: list[dict[str, Any]] | None = None) -> str:
    called = finished.called_tools and (content is None or any(b["type"] == "tool_use" for b in content))
    return "tool_use" if called else STOP_REASONS[finished.reason]


def _usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, int]:
    """Anthropic counts cached prompt tokens apart from input_tokens. The prefix cache is
    automatic: nothing is billed for writing to it (cache_creation_input_tokens is 0)."""
    return {"input_tokens": prompt_tokens - cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached_tokens, "output_tokens": output_tokens}


def _final_usage(finished: Finished) -> dict[str, int]:
    return _usage(finished.prompt_tokens, finished.cached_tokens, finished.completion_tokens)


def _tool_use(name: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": {}}


def _content(result: Collected) -> list[dict[str, Any]]:
    """Thinking, text, the calls, then text written after them (as streamed). A call whose
    arguments are not a JSON object is given back as text, as written, when the model broke
    them; cut off by max_tokens it stays a tool_use block with the input {} (as streamed, and
    as Anthropic's API answers then)."""
    blocks: list[dict[str, Any]] = []
    if result.reasoning:
        blocks.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
    cut = result.finished is not None and result.finished.reason == "length"
    calls = [call for call in result.tool_calls if call.arguments is not None or cut]
    before, after = result.text_around_calls()
    text = before + "".join(c.arguments_json for c in result.tool_calls if c not in calls)
    if text or not calls:
        blocks.append({"type": "text", "text": text})
    blocks += [{**_tool_use(call.name), "input": call.arguments or {}} for call in calls]
    return blocks + ([{"type": "text", "text": after}] if after else [])


def _message(state: AppState, message_id: str, content: list[dict[str, Any]],
             finished: Finished) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": state.model_name,
            "content": content, "stop_reason": _stop_reason(finished, content),
            "stop_sequence": finished.stop_sequence, "usage": _final_usage(finished)}


def _message_start(state: AppState, message_id: str, prompt_tokens: int, cached_tokens: int) -> str:
    message = {"id": message_id, "type": "message", "role": "assistant", "model": state.model_name,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": _usage(prompt_tokens, cached_tokens, 0)}
    return sse.event("message_start", {"type": "message_start", "message": message})


class _BlockStream:
    """Anthropic's content-block events: thinking, text and tool_use blocks, opened as their
    first piece arrives; a tool_use block's input streams as input_json_delta fragments."""

    def __init__(self) -> None:
        self.index = -1
        self.open_kind: str | None = None

    def text(self, text: str) -> list[str]:
        return self._ensure("text", {"type": "text", "text": ""}) + self._delta({"type": "text_delta", "text": text})

    def thinking(self, text: str) -> list[str]:
        return (self._ensure("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                + self._delta({"type": "thinking_delta", "thinking": text}))

    def tool_start(self, name: str) -> list[str]:
        events = self.close() + self._open(_tool_use(name))
        self.open_kind = "tool_use"
        return events

    def tool_args(self, fragment: str) -> list[str]:
        return self._delta({"type": "input_json_delta", "partial_json": fragment})

    def finish(self) -> list[str]:
        """Close the open block; an output with no content still gets one empty text block."""
        if self.index < 0:
            return self._open({"type": "text", "text": ""}) + self._stop()
        return self.close()

    def close(self) -> list[str]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return self._stop()

    def _ensure(self, kind: str, block: dict[str, Any]) -> list[str]:
        if self.open_kind == kind:
            return []
        events = self.close() + self._open(block)
        self.open_kind = kind
        return events

    def _open(self, block: dict[str, Any]) -> list[str]:
        self.index += 1
        return [sse.event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})]

    def _delta(self, delta: dict[str, Any]) -> list[str]:
        return [sse.event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                  "delta": delta})]

    def _stop(self) -> list[str]:
        return [sse.event("content_block_stop", {"type": "content_block_stop", "index": self.index})]


async def _stream(state: AppState, job: GenerationJob, message_id: str) -> AsyncIterator[str]:
    """message_start once the prompt is prefilled (its usage then knows the cached tokens)."""
    blocks = _BlockStream()
    async for _, item in generate_choices(state, [job]):
        if isinstance(item, Prefilled):
            yield _message_start(state, message_id, len(job.prompt_ids), item.cached_tokens)
            yield sse.event("ping", {"type": "ping"})
            continue
        for chunk in _events(blocks, item):
            yield chunk


def _events(blocks: _BlockStream, item: object) -> list[str]:
    if isinstance(item, TextDelta):
        return blocks.text(item.text)
    if isinstance(item, Reasoning):
        return blocks.thinking(item.text)
    if isinstance(item, ToolCallStart):
        return blocks.tool_start(item.name)
    if isinstance(item, ToolCallArgs):
        return blocks.tool_args(item.fragment)
    if isinstance(item, ToolCallEnd):
        return blocks.close()
    if isinstance(item, Finished):
        finished = _checked(item)
        delta = {"type": "message_delta",
                 "delta": {"stop_reason": _stop_reason(finished), "stop_sequence": finished.stop_sequence},
                 "usage": _final_usage(finished)}
        return blocks.finish() + [sse.event("message_delta", delta),
                                  sse.event("message_stop", {"type": "message_stop"})]
    return []


def _stream_error(error: ApiError) -> str:
    return sse.event("error", anthropic_error_body(error.status, error.message))
