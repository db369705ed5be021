"""Anthropic messages, system prompt and tools -> the plain dicts a HF chat template expects.

A user turn's `tool_result` blocks become `tool` messages (in order, before the user's text), an
assistant turn's `tool_use` blocks become `tool_calls`; thinking blocks and blocks of types this
server has no use for are dropped. Images, and documents other than plain text, become a text
placeholder (media.py: the models served here read text only).
"""

from __future__ import annotations

from typing import Any

from appliance.server.anthropic.protocol import (ContentBlock, CountTokensRequest, DocumentBlock,
                                                 ImageBlock, Message, TextBlock, ToolDefinition,
                                                 ToolResultBlock, ToolUseBlock)
from appliance.server.errors import bad_request
from appliance.server.media import document_text, omitted
from appliance.server.tool_parsers import ToolChoice, ToolSpec



def template_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = _system_text(body.system)
    if system:
        out.append({"role": "system", "content": system})
    for message in body.messages:
        out.extend(_convert(message))
    return out


def template_tools(body: CountTokensRequest) -> list[dict[str, Any]] | None:
    """Tools in the OpenAI function shape chat templates know; None when tools are off. A
    tool_choice of type "tool" shows only that tool (steered, not grammar-constrained); a
    choice that no tool can satisfy is a 400."""
    choice, tools = body.tool_choice, client_tools(body)
    if choice is not None and choice.type == "any" and not tools:
        raise bad_request("tool_choice type 'any' needs at least one tool in tools", "tool_choice")
    if choice is not None and choice.type == "tool":
        if not choice.name:
            raise bad_request("tool_choice type 'tool' needs a name", "tool_choice.name")
        tools = [tool for tool in tools if tool.name == choice.name]
        if not tools:
            raise bad_request(f"tool_choice names tool {choice.name!r}, which is not in tools",
                              "tool_choice.name")
    if not tools or (choice is not None and choice.type == "none"):
        return None
    return [_tool(tool) for tool in tools]


def tool_setup(body: CountTokensRequest) -> tuple[list[ToolSpec], ToolChoice | None, bool]:
    """The offered tools, the normalized choice (None: tools are off: type "none" or no tools)
    and whether several calls may come at once (not with disable_parallel_tool_use)."""
    specs = [ToolSpec(t.name, t.input_schema) for t in client_tools(body)]
    choice = body.tool_choice
    parallel = not (choice and choice.disable_parallel_tool_use)
    if not specs or (choice is not None and choice.type == "none"):
        return specs, None, parallel
    if choice is None or choice.type == "auto":
        return specs, ToolChoice("auto"), parallel
    if choice.type == "tool":
        return specs, ToolChoice("named", choice.name), parallel
    return specs, ToolChoice("required"), parallel


def client_tools(body: CountTokensRequest) -> list[ToolDefinition]:
    """The tools the model may call and the client runs; server tools (web search, ...) are
    left out: no client runs them, and this server does not."""
    return [tool for tool in body.tools or [] if tool.is_client_tool]


def _tool(tool: ToolDefinition) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _system_text(system: str | list[TextBlock] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "\n".join(block.text for block in system)


def _convert(message: Message) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        return [_assistant(message.content)]
    return _user(message.content)


def _assistant(blocks: list[ContentBlock]) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": block.input}})
        elif isinstance(block, (ImageBlock, DocumentBlock)):
            texts.append(_media_text(block))
    out: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        out["tool_calls"] = calls
    return out


def _user(blocks: list[ContentBlock]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, (ImageBlock, DocumentBlock)):
            texts.append(_media_text(block))
        elif isinstance(block, ToolResultBlock):
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                        "content": _tool_result_text(block)})
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _tool_result_text(block: ToolResultBlock) -> str:
    if block.content is None or isinstance(block.content, str):
        return block.content or ""
    return "\n".join(part.text if isinstance(part, TextBlock) else _media_text(part)
                     for part in block.content)


def _media_text(block: ImageBlock | DocumentBlock) -> str:
    return omitted("image") if isinstance(block, ImageBlock) else document_text(block.source)
