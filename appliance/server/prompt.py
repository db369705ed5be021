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


async def chat_prompt_ids(state: AppState, messages: list[dict[str, Any]],
                          tools: list[dict[str, Any]] | None,
                          template_kwargs: dict[str, Any] | None = None,
                          continue_final: bool = False) -> list[int]:
    """Render the chat template and encode it: with the generation prompt, or (prefill) open
    at the end of the final assistant message so the model continues it."""
    def render(tokenizer: Any) -> list[int]:
        text = render_chat(tokenizer, messages, tools, template_kwargs or {}, continue_final)
        return list(tokenizer.encode(text, add_special_tokens=False))

    return await state.tokenizers.run(render)


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                variables: dict[str, Any], continue_final: bool = False) -> str:
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
        raise bad_request(f"Cannot apply the chat template to these messages: {e}", "messages") from None
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


async def text_prompt_ids(state: AppState, text: str) -> list[int]:
    """Encode a raw completion prompt (with the tokenizer's own special tokens, e.g. BOS)."""
    def encode(tokenizer: Any) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=True))

    return await state.tokenizers.run(encode)


def check_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> list[int]:
    """Token ids given by the client: a 400 unless non-empty and each in [0, vocab_size)."""
    if not ids:
        raise bad_request("The prompt is empty", param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is outside this model's vocabulary [0, {vocab_size})", param)
    return ids


def output_budget(prompt_len: int, requested: int | None, max_model_len: int,
                  default_cap: int = DEFAULT_MAX_TOKENS_CAP, param: str = "max_tokens") -> int:
    """max_new_tokens for the engine; a 400 when the prompt (plus the request) cannot fit."""
    remaining = max_model_len - prompt_len
    if requested is None:
        if remaining < 1:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens, but the prompt "
                f"is {prompt_len} tokens, which leaves no room for output. Shorten the prompt.",
                "messages")
        return min(remaining, default_cap)
    if requested > remaining:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            f"output). Reduce the length of the prompt or {param}.", param)
    return requested
