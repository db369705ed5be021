"""`POST /v1/responses` (OpenAI Responses API, streamed or not): what Codex CLI speaks to
custom providers. No state is kept (`store` is always false): `previous_response_id` is a 400."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from appliance.server import sse
from appliance.server.auth import require_api_key
from appliance.server.constraints import ResponseFormat, checked, request_constraint
from appliance.server.errors import ApiError, bad_request, openai_error_body
from appliance.server.generation import (Finished, GenerationJob, Prefilled, SamplingOptions, collect,
                                         generate_choices, require_engine)
from appliance.server.json_body import JsonBodyRoute
from appliance.server.prompt import chat_prompt_ids, output_budget
from appliance.server.request_context import arrival_time, check_model, session_hint, user_hint
from appliance.server.responses.output import OutputBuilder, new_id, whole_output
from appliance.server.responses.protocol import FunctionTool, ResponsesRequest
from appliance.server.responses.template import function_tools, template_messages, template_tools, tool_setup
from appliance.server.state import AppState, get_state

router = APIRouter(route_class=JsonBodyRoute, dependencies=[Depends(require_api_key)])


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    _reject_unsupported(body)
    tools = function_tools(body)
    specs, choice = tool_setup(body, tools)
    effort = body.reasoning.effort if body.reasoning else None
    prompt_ids = await chat_prompt_ids(state, template_messages(body), template_tools(tools, choice),
                                       {"reasoning_effort": effort} if effort else None,
                                       param="input")
    text_format = body.text.format if body.text else None
    response_format = ResponseFormat(text_format.type, text_format.schema_) if text_format else ResponseFormat()
    if response_format.kind == "json_schema" and response_format.schema is None:
        raise bad_request("text.format json_schema needs a JSON schema object in schema", "text.format.schema")
    constraint = request_constraint(state.tool_format, specs, choice, body.parallel_tool_calls is not False,
                                    response_format)
    sampling = SamplingOptions(
        max_tokens=output_budget(len(prompt_ids), body.max_output_tokens, state.client.max_model_len,
                                 param="max_output_tokens", prompt_param="input"),
        **state.sampling_defaults.fill(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
        seed=body.seed,
        speculative=body.speculative,
        constraint=await checked(state, constraint, "tools" if specs else "text.format"))
    job = GenerationJob.chat_reply(prompt_ids, sampling, specs, choice,
                                   session=session_hint(request, body.session_id, body.prompt_cache_key),
                                   user=user_hint(request, body.user), arrived_at=arrival_time(request))
    head = ResponseHead.of(state, body, tools)
    require_engine(state)
    if body.stream:
        writer = StreamWriter(head)
        return sse.response(sse.guarded(writer.stream(state, job), writer.error))
    (result,) = await collect(request, state, [job])
    finished = _checked(result.finished)
    return JSONResponse(head.response(_status(finished), whole_output(result, _status(finished)), finished))


def _reject_unsupported(body: ResponsesRequest) -> None:
    if body.previous_response_id:
        raise bad_request("previous_response_id is not supported: this server stores no responses "
                          "(store is always false); send the whole conversation in input",
                          "previous_response_id")
    if body.background:
        raise bad_request("background responses are not supported by this server", "background")
    if body.top_logprobs:
        raise bad_request("top_logprobs is not supported by this server", "top_logprobs")


def _checked(finished: Finished | None) -> Finished:
    if finished is None or finished.reason == "abort":
        raise ApiError(503, "The response was aborted before it finished (the server is shutting down)")
    return finished


def _status(finished: Finished) -> str:
    """Of the response and of its last item: cut off by max_output_tokens, or completed."""
    return "incomplete" if finished.reason == "length" else "completed"


@dataclass(frozen=True)
class ResponseHead:
    """The response's identity and the request fields it echoes."""

    id: str
    created_at: int
    fields: dict[str, Any]

    @classmethod
    def of(cls, state: AppState, body: ResponsesRequest, tools: list[FunctionTool]) -> ResponseHead:
        choice = body.tool_choice
        fields = {
            "model": state.model_name, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None, "store": False, "temperature": body.temperature, "top_p": body.top_p,
            "tool_choice": choice.model_dump() if choice is not None and not isinstance(choice, str) else (choice or "auto"),
            "tools": [tool.model_dump(exclude_none=True) for tool in tools],
            "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)} if body.text
            else {"format": {"type": "text"}},
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "truncation": body.truncation or "disabled", "user": body.user, "metadata": {},
        }
        return cls(new_id("resp"), int(time.time()), fields)

    def response(self, status: str, output: list[dict[str, Any]], finished: Finished | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": error, "incomplete_details": incomplete, **self.fields, "output": output,
                "usage": _usage(finished) if finished else None}


def _usage(finished: Finished) -> dict[str, Any]:
    return {"input_tokens": finished.prompt_tokens,
            "input_tokens_details": {"cached_tokens": finished.cached_tokens},
            "output_tokens": finished.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": finished.reasoning_tokens},
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


@dataclass
class StreamWriter:
    """The SSE stream of one response: numbered events, and `error` + `response.failed` when it
    fails after it started."""

    head: ResponseHead
    builder: OutputBuilder = field(default_factory=OutputBuilder)
    sequence: int = 0

    def event(self, payload: dict[str, Any]) -> str:
        out = sse.event(payload["type"], {**payload, "sequence_number": self.sequence})
        self.sequence += 1
        return out

    async def stream(self, state: AppState, job: GenerationJob) -> AsyncIterator[str]:
        yield self.event({"type": "response.created", "response": self.head.response("in_progress", [])})
        yield self.event({"type": "response.in_progress", "response": self.head.response("in_progress", [])})
        async for _, item in generate_choices(state, [job]):
            if isinstance(item, Prefilled):
                continue
            if isinstance(item, Finished):
                finished = _checked(item)
                for payload in self.builder.close(_status(finished)):
                    yield self.event(payload)
                status = _status(finished)
                kind = "response.completed" if status == "completed" else "response.incomplete"
                yield self.event({"type": kind, "response": self.head.response(status, self.builder.items, finished)})
                return
            for payload in self.builder.on(item):
                yield self.event(payload)

    def error(self, error: ApiError) -> str:
        code = error.code or openai_error_body(error.status, error.message)["error"]["type"]
        failed = self.head.response("failed", self.builder.items, error={"code": code, "message": error.message})
        return (self.event({"type": "error", "code": code, "message": error.message, "param": error.param})
                + self.event({"type": "response.failed", "response": failed}))
