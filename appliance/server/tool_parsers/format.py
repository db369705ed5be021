"""`ToolCallFormat`: one model family's tool-call markup, as a streaming parser and as a grammar.

A format object is made once per app for the served model's tokenizer (its added tokens decide
how markup is written in grammars); `parser(tools)` makes a parser per request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from appliance.server.tool_parsers.base import StreamParser, ToolChoice, ToolSpec
from appliance.server.tool_parsers.grammar import Markup, start_rule


class ToolCallFormat(ABC):
    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]  # every markup string (kept in the text, never in content)
    opener: ClassVar[str]  # the marker that opens the calls
    template_markers: ClassVar[tuple[str, ...]]  # all found in a chat template: this format
    always_parse: ClassVar[bool] = False  # parse even without tools (reasoning channels)

    def __init__(self, token_strings: frozenset[str] = frozenset()) -> None:
        self.markup = Markup(token_strings)

    @classmethod
    def detects(cls, chat_template: str) -> bool:
        return all(marker in chat_template for marker in cls.template_markers)

    @abstractmethod
    def parser(self, tools: list[ToolSpec]) -> StreamParser: ...

    @abstractmethod
    def region(self, tools: list[ToolSpec], parallel_calls: bool) -> list[str]:
        """Lark rules defining `region`: what follows the opener up to the end of the calls
        (one call, or one or more when `parallel_calls`), each call one of `tools`."""

    def forced_call_grammar(self, tools: list[ToolSpec], tool_choice: ToolChoice,
                            parallel_calls: bool, text_rule: str | None = None) -> str:
        """A Lark grammar accepting exactly this format's calls of the tools `tool_choice`
        allows (`required`/`named`: calls only), or for `auto` text or calls (a single call
        unless `parallel_calls`). `text_rule` replaces free text (a response_format's JSON)."""
        allowed = tool_choice.allowed(tools)
        if not allowed:
            raise ValueError(f"tool_choice {tool_choice} allows none of the tools")
        start = start_rule(self.markup, self.opener, "region", text_rule,
                           forced=tool_choice.mode != "auto", free_text=list(self.markers))
        return "\n".join([*start, *self.region(allowed, parallel_calls)]) + "\n"

    def _calls(self, call_rules: list[str], separator: str, parallel_calls: bool) -> str:
        """`region`'s body for formats whose every call repeats the opener: the first call's
        rest, then (parallel) more calls, each `separator`, opener, call."""
        first = " | ".join(call_rules)
        if not parallel_calls:
            return f"region: {first}"
        sep = f"{separator} " if separator else ""
        return f"region: ({first}) ({sep}{self.markup(self.opener)} ({first}))*"
