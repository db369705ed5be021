"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types; unknown fields are
ignored). Numeric ranges are those of OpenAI's API, narrowed to what the engine accepts."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.server.field_types import (INT32_MAX, STRICT_BODY, ObjectSchema, Probability,
                                          RepetitionPenalty, Seed, StopString, StopStrings,
                                          TokenCount, TokenId)

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=-1, le=INT32_MAX)]  # vLLM's extension: -1 and 0 are off
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]  # presence / frequency
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
MAX_LOGIT_BIAS = 1024  # entries: each is work in every step of the request
MAX_LOGPROBS = 20  # alternatives per token
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class _Body(BaseModel):
    model_config = STRICT_BODY


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: ObjectSchema | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Body):
    include_usage: bool = False


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` extension: exactly one of a JSON schema, any JSON object, or
    an llguidance Lark grammar (which may embed JSON schemas with `%json {...}`)."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    grammar: str | None = None
    regex: str | None = None  # refused with a 400: not supported
    choice: list[str] | None = None  # refused with a 400: not supported


class SamplingFields(_Body):
    """Fields the chat and completions requests share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: StopString | StopStrings | None = None
    n: int = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    repetition_penalty: RepetitionPenalty | None = None  # vLLM
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None  # vLLM extension
    structured_outputs: StructuredOutputs | None = None  # vLLM extension
    user: str | None = None
    session_id: str | None = None  # TokenSpeed: agent session hint (see README)
    ignore_eos: bool = False  # TokenSpeed/vLLM extension, for benchmarks
    speculative: bool = True  # TokenSpeed extension: false opts out of speculative decoding
    return_token_ids: bool = False  # TokenSpeed/vLLM extension: the final choice lists token ids


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: LogprobCount | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI's deprecated forms of tools / tool_choice: refused by name (chat.py), not ignored
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(SamplingFields):
    # one prompt: text, or token ids (each below the model's vocabulary size: checked per request)
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    logprobs: LogprobCount | None = None
    best_of: int | None = None
    suffix: str | None = None
