"""Responses input (a string, or items) and tools -> the dicts a HF chat template expects.

`instructions` is the system message. Function calls join the assistant message before them
(or start one), their outputs become `tool` messages, and a reasoning item is handed to the
next assistant message as `reasoning_content` (and `thinking`, GPT-OSS's template's name). With
no stored state every turn is in the input, so `previous_response_id` and item references are
refused. A custom tool's call is a function call with its input as `{"input": ...}`, a
local_shell call one of `local_shell` with its action; images and files become a placeholder
(media.py); hosted tools and their calls are left out.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from appliance.server.errors import bad_request
from appliance.server.openai.template import parts_text, tool_call_arguments
from appliance.server.responses.protocol import (ContentPart, CustomToolCallItem, FunctionCallItem,
                                                 FunctionCallOutputItem, FunctionChoice, FunctionTool,
                                                 LocalShellCallItem, MessageItem, ReasoningItem,
                                                 ResponsesRequest)
from appliance.server.tool_parsers import ToolChoice, ToolSpec

log = logging.getLogger(__name__)

TEXT_PARTS = {"input_text", "output_text", "text", "summary_text", "reasoning_text"}
STATEFUL_ITEMS = {"item_reference"}  # items that point at state kept by the server


def template_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return out + [{"role": "user", "content": body.input}]
    reasoning: list[str] = []
    for i, item in enumerate(body.input):
        where = f"input.{i}"
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _text(item.content, f"{where}.content")})
            if role == "assistant":
                _attach_reasoning(out[-1], reasoning)
        elif isinstance(item, FunctionCallItem):
            _add_call(out, reasoning, item.call_id, item.name, tool_call_arguments(item.arguments))
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": _text(item.output, f"{where}.output")})
        elif isinstance(item, CustomToolCallItem):
            _add_call(out, reasoning, item.call_id, item.name, {"input": item.input})
        elif isinstance(item, LocalShellCallItem):
            _add_call(out, reasoning, item.call_id, "local_shell", item.action)
        elif isinstance(item, ReasoningItem):
            reasoning.extend(part.text or "" for part in [*item.summary, *(item.content or [])])
        elif item.type in STATEFUL_ITEMS:
            raise bad_request(f"input items of type {item.type!r} are not supported (this server keeps no "
                              "state: send the items themselves)", f"{where}.type")
        else:  # a hosted tool's call (web_search_call, ...): nothing the model can act on
            _left_out(f"input items of type {item.type!r}")
    return out


def _add_call(out: list[dict[str, Any]], reasoning: list[str], call_id: str, name: str,
              arguments: Any) -> None:
    _assistant(out, reasoning).setdefault("tool_calls", []).append(
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})


def _assistant(out: list[dict[str, Any]], reasoning: list[str]) -> dict[str, Any]:
    """The assistant message a function call belongs to: the last message if it is one."""
    if not out or out[-1]["role"] != "assistant":
        out.append({"role": "assistant", "content": ""})
        _attach_reasoning(out[-1], reasoning)
    return out[-1]


def _attach_reasoning(message: dict[str, Any], reasoning: list[str]) -> None:
    if reasoning:
        message["reasoning_content"] = message["thinking"] = "\n".join(reasoning)
        reasoning.clear()


def _text(content: str | list[ContentPart], where: str) -> str:
    if isinstance(content, str):
        return content
    return parts_text(content, TEXT_PARTS, where)


def function_tools(body: ResponsesRequest) -> list[FunctionTool]:
    """The function tools; hosted tools (web_search, file_search, local_shell, custom, ...) are
    left out: this server cannot run them, and refusing them would fail every turn of an agent
    configured with one (`codex --search`)."""
    tools = []
    for tool in body.tools or []:
        if isinstance(tool, FunctionTool):
            tools.append(tool)
        else:
            _left_out(f"tools of type {tool.type!r}")
    return tools


@functools.lru_cache(maxsize=None)
def _left_out(what: str) -> None:
    log.info("responses: %s are left out (this server runs function tools only; logged once)", what)


def template_tools(tools: list[FunctionTool], choice: ToolChoice | None) -> list[dict[str, Any]] | None:
    """The tools the chat template shows (a named choice: that one; tools off: none)."""
    if choice is None:
        return None
    shown = [t for t in tools if choice.mode != "named" or t.name == choice.name]
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.parameters or {"type": "object", "properties": {}}}}
            for t in shown]


def tool_setup(body: ResponsesRequest, tools: list[FunctionTool]) -> tuple[list[ToolSpec], ToolChoice | None]:
    """The offered functions and the normalized choice (None: tools are off); a choice no tool
    can satisfy is a 400."""
    specs = [ToolSpec(t.name, t.parameters or {}) for t in tools]
    choice = body.tool_choice
    if choice == "required" and not specs:
        raise bad_request("tool_choice 'required' needs at least one tool in tools", "tool_choice")
    if isinstance(choice, FunctionChoice) and choice.name not in {s.name for s in specs}:
        raise bad_request(f"tool_choice names function {choice.name!r}, which is not in tools", "tool_choice")
    if not specs or choice == "none":
        return specs, None
    if isinstance(choice, FunctionChoice):
        return specs, ToolChoice("named", choice.name)
    return specs, ToolChoice("required" if choice == "required" else "auto")
