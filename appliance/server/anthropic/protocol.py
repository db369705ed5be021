"""Request bodies of the Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`):
pydantic, strict types, unknown fields ignored; numeric ranges those of Anthropic's API, narrowed
to what the engine accepts."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from appliance.server.field_types import (STRICT_BODY, ObjectSchema, Probability, StopStrings,
                                           TokenCount, TopK, tagged_union)

Temperature = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class _Block(BaseModel):
    model_config = STRICT_BODY  # ignores e.g. cache_control, citations


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ImageBlock(_Block):
    type: Literal["image"]
    source: dict[str, Any] = Field(default_factory=dict)


class DocumentBlock(_Block):
    type: Literal["document"]
    source: dict[str, Any] = Field(default_factory=dict)


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock | DocumentBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str = ""
    signature: str | None = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str = ""


class OtherBlock(_Block):
    """A block of a type this server has no use for (server tools' `server_tool_use` and
    `web_search_tool_result`, say, in a conversation begun on Anthropic's API): dropped."""
    type: str


ContentBlock = tagged_union("block", {
    "text": TextBlock, "image": ImageBlock, "document": DocumentBlock, "tool_use": ToolUseBlock,
    "tool_result": ToolResultBlock, "thinking": ThinkingBlock,
    "redacted_thinking": RedactedThinkingBlock}, OtherBlock)


class Message(_Block):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolDefinition(_Block):
    """A client tool (`type` absent or "custom"); a server tool (`web_search_20250305`, ...)
    is one Anthropic's servers run: the template leaves it out."""
    type: str | None = None
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: ObjectSchema = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @property
    def is_client_tool(self) -> bool:
        return self.type in (None, "custom")


class ToolChoice(_Block):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(_Block):
    user_id: str | None = None
    session_id: str | None = None  # TokenSpeed: agent session hint (see README)


class CountTokensRequest(_Block):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: TokenCount
    stop_sequences: StopStrings | None = None
    stream: bool = False
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    metadata: Metadata | None = None
    speculative: bool = True  # TokenSpeed extension: false opts out of speculative decoding
