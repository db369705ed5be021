"""Prompts: chat template -> token ids (off the event loop), and the output-length budget."""

from __future__ import annotations

from typing import Any

import anyio
import jinja2

from appliance.server.errors import bad_request
from appliance.server.state import AppState

# When a request gives no max_tokens we allow the rest of the context window, capped here so
# that a client which forgot the field cannot hold KV pages for a whole context of rambling.
DEFAULT_MAX_TOKENS_CAP = 8192
_RESERVED_TEMPLATE_ARGS = {"conversation", "messages", "tools", "add_generation_prompt", "tokenize",
                           "return_dict", "chat_template", "continue_final_message"}


async def chat_prompt_ids(state: AppState, messages: list[dict[str, Any]],
                          tools: list[dict[str, Any]] | None,
                          template_kwargs: dict[str, Any] | None = None,
                          continue_final: bool = False) -> list[int]:
    """Render the chat template and encode it: with the generation prompt, or (prefill) open
    at the end of the final assistant message so the model continues it."""
    extra = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_ARGS}
    if continue_final:
        extra["continue_final_message"] = True

    def render() -> list[int]:
        text = render_chat(state.tokenizer, messages, tools, extra)
        return list(state.tokenizer.encode(text, add_special_tokens=False))

    return await anyio.to_thread.run_sync(render, limiter=state.tokenize_limiter)


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                extra: dict[str, Any]) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False,
            add_generation_prompt=not extra.get("continue_final_message", False), **extra)
    except jinja2.TemplateError as e:
        raise bad_request(f"The chat template rejected the messages: {e}", "messages") from None
    except ValueError as e:  # e.g. the tokenizer has no chat template
        raise bad_request(f"Cannot apply the chat template: {e}", "messages") from None
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


async def text_prompt_ids(state: AppState, text: str) -> list[int]:
    """Encode a raw completion prompt (with the tokenizer's own special tokens, e.g. BOS)."""
    def encode() -> list[int]:
        return list(state.tokenizer.encode(text, add_special_tokens=True))

    return await anyio.to_thread.run_sync(encode, limiter=state.tokenize_limiter)


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
