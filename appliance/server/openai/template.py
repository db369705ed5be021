"""OpenAI chat messages and tools -> the plain dicts a HF chat template expects."""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from appliance.server.errors import bad_request
from appliance.server.json_body import strict_loads
from appliance.server.media import MEDIA_PARTS, omitted
from appliance.server.openai.protocol import (ChatMessage, ContentPart, NamedToolChoice, Tool,
                                              ToolCall)

TEXT_PART_TYPES = {"text", "input_text"}


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [_message(i, m) for i, m in enumerate(messages)]


def template_tools(tools: list[Tool] | None,
                   tool_choice: str | NamedToolChoice | None) -> list[dict[str, Any]] | None:
    """The tools the chat template shows: none for tool_choice "none"; only the named one for a
    named choice (the model is steered to it, not constrained by a grammar). A choice that no
    tool can satisfy is a 400, as in OpenAI's API."""
    if tool_choice == "required" and not tools:
        raise bad_request("tool_choice 'required' needs at least one tool in tools", "tool_choice")
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        tools = [tool for tool in tools or [] if tool.function.name == name]
        if not tools:
            raise bad_request(f"tool_choice names function {name!r}, which is not in tools",
                              "tool_choice")
    if not tools or tool_choice == "none":
        return None
    return [tool.model_dump(exclude_none=True) for tool in tools]


def _message(index: int, message: ChatMessage) -> dict[str, Any]:
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": _text(index, message.content)}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [_tool_call(call) for call in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _text(index: int, content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return parts_text(content, TEXT_PART_TYPES, f"messages.{index}.content")


def parts_text(parts: list[ContentPart], text_types: Container[str], where: str) -> str:
    """Content parts (chat's or the Responses API's) as one text: the parts of `text_types`,
    images / audio / files as placeholders (media.py); any other part a 400 at `where`.N."""
    texts = []
    for j, part in enumerate(parts):
        if part.type in MEDIA_PARTS:
            texts.append(omitted(MEDIA_PARTS[part.type]))
        elif part.type in text_types and part.text is not None:
            texts.append(part.text)
        else:
            raise bad_request(f"Content parts of type {part.type!r} are not supported (text, "
                              "and images or files as a placeholder)", f"{where}.{j}")
    return "\n".join(texts)


def _tool_call(call: ToolCall) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "function", "function": {
        "name": call.function.name, "arguments": tool_call_arguments(call.function.arguments)}}
    if call.id:
        out["id"] = call.id
    return out


def tool_call_arguments(arguments: str | dict[str, Any]) -> Any:
    """Arguments go to the template as an object when they are JSON (templates `tojson` them)."""
    if isinstance(arguments, str):
        try:
            parsed = strict_loads(arguments) if arguments.strip() else {}
            return parsed if isinstance(parsed, dict) else arguments
        except ValueError:
            pass
    return arguments
