"""Tool-call formats: one file per model family's markup, each a streaming parser (markup in,
content / reasoning / call pieces out) and a grammar for forced calls (Lark for llguidance).

| module | what |
|---|---|
| `base` | `ToolSpec`, `ToolChoice`, the pieces a parser emits, `StreamParser` (buffer, states, output) |
| `format` | `ToolCallFormat`: a family's parser factory and `forced_call_grammar` |
| `grammar` | Lark building blocks (token-or-literal markup, text without markers, `%json` values) |
| `key_value` | base of formats whose arguments are key/value markup; values typed by schema |
| `sectioned` | base of formats with a section of special tokens around JSON calls |
| `hermes` | Hermes / Qwen2.5 / Qwen3 / the tiny model: `<tool_call>{json}</tool_call>` |
| `qwen3_coder` | Qwen3-Coder: `<function=NAME><parameter=KEY>` |
| `glm45` | GLM-4.5/4.6/4.7: `<tool_call>NAME<arg_key>/<arg_value>` |
| `kimi_k2` | Kimi-K2: `<|tool_calls_section_begin|>` ... `functions.NAME:IDX` |
| `deepseek_v3` | DeepSeek-V3 (0324): `function<｜tool▁sep｜>NAME` and a ```json fence |
| `deepseek_v31` | DeepSeek-V3.1: `NAME<｜tool▁sep｜>{json}` |
| `harmony` | GPT-OSS: channels (analysis -> reasoning), `to=functions.NAME` calls |

`select_format(name, tokenizer)` picks the format: `server.tool_parser` names one, or `auto`
finds the first whose markers the model's chat template contains (Hermes when none does).
"""

from __future__ import annotations

from typing import Any

from appliance.server.tool_parsers.base import (ParsedToolCall, Piece, Reasoning, StreamParser, ToolCallArgs,
                                                ToolCallEnd, ToolCallStart, ToolChoice, ToolSpec)
from appliance.server.tool_parsers.deepseek_v3 import DeepSeekV3
from appliance.server.tool_parsers.deepseek_v31 import DeepSeekV31
from appliance.server.tool_parsers.format import ToolCallFormat
from appliance.server.tool_parsers.glm45 import Glm45
from appliance.server.tool_parsers.harmony import Harmony
from appliance.server.tool_parsers.hermes import Hermes
from appliance.server.tool_parsers.kimi_k2 import KimiK2
from appliance.server.tool_parsers.qwen3_coder import Qwen3Coder

# Detection order: a format whose markers include another's comes first.
FORMATS: dict[str, type[ToolCallFormat]] = {
    f.name: f for f in (Harmony, Qwen3Coder, Glm45, KimiK2, DeepSeekV3, DeepSeekV31, Hermes)}


def detect_format(chat_template: str) -> type[ToolCallFormat]:
    return next((f for f in FORMATS.values() if f.detects(chat_template)), Hermes)


def select_format(name: str, tokenizer: Any) -> ToolCallFormat:
    """The format for `server.tool_parser` (`auto`: from the chat template) and this tokenizer."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: read them all
        template = "\n".join(str(t) for t in template.values())
    cls = detect_format(template or "") if name == "auto" else FORMATS[name]
    return cls(added_token_strings(tokenizer))


def added_token_strings(tokenizer: Any) -> frozenset[str]:
    """The tokenizer's added tokens (llguidance matches them only as tokens, never as text)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(token.content for token in added.values())


__all__ = ["FORMATS", "ParsedToolCall", "Piece", "Reasoning", "StreamParser", "ToolCallArgs",
           "ToolCallEnd", "ToolCallFormat", "ToolCallStart", "ToolChoice", "ToolSpec",
           "detect_format", "select_format"]
