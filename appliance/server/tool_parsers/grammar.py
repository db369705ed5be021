"""Lark grammars for llguidance (the engine's constrained decoding): the pieces the formats
build their forced-call grammars from.

llguidance matches a tokenizer's added tokens only as tokens (`<|name|>` in a rule), never as
text, so a markup string is written as a token reference when the tokenizer has it as a token
and as a string literal otherwise (`Markup`). A free-text terminal followed by a literal cannot
be split by llguidance's greedy lexer, so text that ends at a literal marker is one terminal
(`text_until`). JSON values are `%json` schemas laid out as the chat templates write them
(`tojson`: `", "` and `": "`, no other whitespace), which also keeps a model from padding
whitespace forever.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.engine.constraints import JSON_LAYOUT

ANY_TEXT = r"/(.|\n)*/"
_REGEX_SPECIAL = set("\\.+*?()|[]{}^$#&-~/")


def literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def json_value(schema: dict[str, Any]) -> str:
    """A `%json` value matching `schema`, in the templates' compact layout."""
    guidance = {**JSON_LAYOUT, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": guidance}, ensure_ascii=False)


def regex_escape(text: str) -> str:
    """`text` as a literal inside a Lark `/regex/` (Rust regex syntax; `/` delimits)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else _regex_char(c) for c in text)


def _regex_char(c: str) -> str:
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, c)


def text_without(markers: list[str]) -> str:
    """A terminal body: any text (maybe empty) that contains none of `markers`."""
    if not markers:
        return ANY_TEXT
    alternatives = "|".join(regex_escape(m) for m in markers)
    return rf"{ANY_TEXT} & ~/(.|\n)*({alternatives})(.|\n)*/"


def text_until(end: str, forbidden: list[str]) -> str:
    """A terminal body: text free of `forbidden` and of `end`, then `end` (a literal)."""
    return f"({text_without([end, *forbidden])}) {literal(end)}"


class Markup:
    """Renders markup strings for one tokenizer: `<tok>` for its added tokens, else a literal."""

    def __init__(self, token_strings: frozenset[str] = frozenset()) -> None:
        self.tokens = token_strings

    def is_token(self, text: str) -> bool:
        return text in self.tokens

    def __call__(self, text: str) -> str:
        return text if self.is_token(text) else literal(text)

    def text_then(self, name: str, end: str, forbidden: list[str]) -> tuple[str, list[str]]:
        """(expression, definitions) for free text free of `forbidden` followed by `end`; `name`
        (upper case) names the terminal(s) defined."""
        if self.is_token(end):
            return f"{name} {end}", [f"{name}: {text_without(forbidden)}"]
        return name, [f"{name}: {text_until(end, forbidden)}"]


def start_rule(markup: Markup, opener: str, region: str, text_rule: str | None,
               forced: bool, free_text: list[str]) -> list[str]:
    """The `start` rule: the opener then `region` (the calls) when forced; else the text answer
    or (free text then) the calls. `text_rule` replaces free text by another answer (a JSON
    value for response_format); free text never contains the markers in `free_text`."""
    if forced:
        return [f"start: {markup(opener)} {region}"]
    if text_rule is not None:
        return [f"start: {text_rule} | {markup(opener)} {region}"]
    text_then_open, definitions = markup.text_then("TEXT_OPEN", opener, free_text)
    return [f"start: TEXT | {text_then_open} {region}", f"TEXT: {text_without(free_text)}",
            *definitions]
