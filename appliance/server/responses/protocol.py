"""Request body of `POST /v1/responses` (pydantic, strict types, unknown fields ignored).

Input items and tools of other types parse into `Unsupported*`: the handler refuses item
references (state this server does not keep) with a 400 naming the item, and leaves out hosted
tools and their calls (web search, say), which it cannot run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from appliance.server.field_types import (STRICT_BODY, ObjectSchema, Probability, Seed,
                                           TokenCount, tagged_union)
from appliance.server.openai.protocol import ContentPart, Temperature, TopK  # parts: text only


class _Body(BaseModel):
    model_config = STRICT_BODY


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""


class FunctionCallOutputItem(_Body):
    """A function's output, or a custom tool's (the same fields)."""
    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: str
    output: str | list[ContentPart]


class CustomToolCallItem(_Body):
    """A call of a `custom` (free-form input) tool, such as Codex's apply_patch for some models."""
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str = ""


class LocalShellCallItem(_Body):
    """A call of the `local_shell` tool (its output comes back as a function_call_output)."""
    type: Literal["local_shell_call"]
    call_id: str
    action: dict[str, Any] = Field(default_factory=dict)


class ReasoningItem(_Body):
    type: Literal["reasoning"]
    summary: list[ContentPart] = Field(default_factory=list)
    content: list[ContentPart] | None = None


class UnsupportedItem(_Body):
    type: str


InputItem = tagged_union("item", {
    "message": MessageItem, "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem, "custom_tool_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem, "custom_tool_call": CustomToolCallItem,
    "local_shell_call": LocalShellCallItem}, UnsupportedItem, default="message")


class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: ObjectSchema | None = None
    strict: bool | None = None


class UnsupportedTool(_Body):
    type: str


ToolDefinition = tagged_union("tool", {"function": FunctionTool}, UnsupportedTool)


class FunctionChoice(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat = Field(default_factory=TextFormat)


class ReasoningConfig(_Body):
    effort: str | None = None


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None  # TokenSpeed/vLLM extension
    seed: Seed | None = None  # TokenSpeed/vLLM extension
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    user: str | None = None
    prompt_cache_key: str | None = None  # Codex sends its conversation id: the session hint
    session_id: str | None = None  # TokenSpeed: agent session hint (see README)
    speculative: bool = True  # TokenSpeed extension: false opts out of speculative decoding
    include: list[str] | None = None
