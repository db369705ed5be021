"""Prompts: chat template -> token ids (in the tokenizer pool, off the event loop), the
output-length budget, and the check of prompts given as token ids."""

from __future__ import annotations

import inspect
from typing import Any

import jinja2

from appliance.server.errors import bad_request
from appliance.server.state import AppState

# When a request gives no max_tokens we allow the rest of the context window, capped here so
# that a client which forgot the field cannot hold KV pages for a whole context of rambling.
DEFAULT_MAX_TOKENS_CAP = 8192
# Errors a template raises on values it cannot handle (a variable of the wrong type from
# chat_template_kwargs, a message shape it refuses): the request's fault, so a 400.
_TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)
# A prompt of more characters than this many per token of the context window is counted in
# chunks first, until it has more tokens than the window holds: a body that could never fit
# (tens of MB) is refused in a fraction of a second instead of holding a tokenizer worker for
# tens of seconds. Text averages 3-5 characters a token; a prompt past this that does fit
# (long runs of one character) is then encoded whole as any other.
COUNT_FIRST_CHARS_PER_TOKEN = 8
COUNT_CHUNK_CHARS = 1 << 18
CHUNK_EDGE_TOKENS = 16  # what cutting the text at a chunk's edge may add to the count


async def chat_prompt_ids(state: AppState, messages: list[dict[str, Any]],
                          tools: list[dict[str, Any]] | None,
                          template_kwargs: dict[str, Any] | None = None,
                          continue_final: bool = False, param: str = "messages") -> list[int]:
    """Render the chat template and encode it: with the generation prompt, or (prefill) open
    at the end of the final assistant message so the model continues it. `param`: the field
    a 400 about the messages names (the Responses API's `input`)."""
    max_model_len = state.client.max_model_len

    def render(tokenizer: Any) -> list[int]:
        text = render_chat(tokenizer, messages, tools, template_kwargs or {}, continue_final,
                           param)
        return encode_fitting(tokenizer, text, False, max_model_len, param)

    return await state.tokenizers.run(render)


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                variables: dict[str, Any], continue_final: bool = False,
                param: str = "messages") -> str:
    """The chat template's text. `variables` (chat_template_kwargs) reach the template only as
    variables: `messages` and the names of apply_chat_template's own parameters (tokenize,
    documents...) are dropped."""
    reserved = {"messages", *inspect.signature(tokenizer.apply_chat_template).parameters}
    extra = {k: v for k, v in variables.items() if k not in reserved}
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=not continue_final,
            continue_final_message=continue_final, **extra)
    except _TEMPLATE_ERRORS as e:  # also: the tokenizer has no chat template (ValueError)
        raise bad_request(f"Cannot apply the chat template to these messages: {e}", param) from None
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


async def text_prompt_ids(state: AppState, text: str) -> list[int]:
    """Encode a raw completion prompt (with the tokenizer's own special tokens, e.g. BOS)."""
    max_model_len = state.client.max_model_len

    def encode(tokenizer: Any) -> list[int]:
        return encode_fitting(tokenizer, text, True, max_model_len, "prompt")

    return await state.tokenizers.run(encode)


def encode_fitting(tokenizer: Any, text: str, add_special_tokens: bool, max_model_len: int,
                   param: str) -> list[int]:
    """`text`'s token ids; a 400 naming `param`, before encoding it whole, when text far longer
    than the context window (COUNT_FIRST_CHARS_PER_TOKEN) has more tokens than the window in
    its first chunks."""
    if len(text) > COUNT_FIRST_CHARS_PER_TOKEN * max_model_len:
        counted = 0
        for start in range(0, len(text), COUNT_CHUNK_CHARS):
            chunk = text[start:start + COUNT_CHUNK_CHARS]
            counted += len(tokenizer.encode(chunk, add_special_tokens=False)) - CHUNK_EDGE_TOKENS
            if counted > max_model_len:
                raise bad_request(
                    f"This model's maximum context length is {max_model_len} tokens, but the "
                    f"prompt has more than {counted} tokens in its first {start + len(chunk)} "
                    f"characters (of {len(text)}). Shorten the prompt.", param)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def check_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> list[int]:
    """Token ids given by the client: a 400 unless non-empty and each in [0, vocab_size)."""
    if not ids:
        raise bad_request("The prompt is empty", param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is outside this model's vocabulary [0, {vocab_size})", param)
    return ids


def output_budget(prompt_len: int, requested: int | None, max_model_len: int,
                  default_cap: int = DEFAULT_MAX_TOKENS_CAP, param: str = "max_tokens",
                  prompt_param: str = "messages") -> int:
    """max_new_tokens for the engine; a 400 when the prompt (plus the request) cannot fit,
    naming `prompt_param` when the prompt alone fills the window, else `param`."""
    remaining = max_model_len - prompt_len
    if requested is None:
        if remaining < 1:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens, but the prompt "
                f"is {prompt_len} tokens, which leaves no room for output. Shorten the prompt.",
                prompt_param)
        return min(remaining, default_cap)
    if requested > remaining:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            f"output). Reduce the length of the prompt or {param}.", param)
    return requested
