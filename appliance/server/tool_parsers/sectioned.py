"""Calls in a section of special tokens, with JSON arguments (kimi_k2, deepseek_v3,
deepseek_v31): `SECTION_BEGIN (CALL_BEGIN header ARGUMENTS CALL_END)+ SECTION_END`.

The call is recognized once its header (the text before the arguments, holding the name) is
complete; the arguments then stream as the model writes them. A call naming no offered tool is
given back as text.
"""

from __future__ import annotations

import re
from typing import ClassVar

from appliance.server.tool_parsers.base import StreamParser, ToolSpec
from appliance.server.tool_parsers.format import ToolCallFormat

MAX_HEADER_CHARS = 256


class SectionedJsonParser(StreamParser):
    SECTION_BEGIN: ClassVar[str]
    SECTION_END: ClassVar[str]
    CALL_BEGIN: ClassVar[str]
    CALL_END: ClassVar[str]
    HEADER: ClassVar[re.Pattern[str]]  # after CALL_BEGIN up to the arguments; group 1: the name
    ARGS_ENDS: ClassVar[tuple[str, ...]]  # each ends the arguments and the call

    after_opener = "section"

    def __init__(self, tools: list[ToolSpec]) -> None:
        super().__init__(tools)
        self.opener = self.SECTION_BEGIN
        self._args_begun = False

    def _on_section(self, final: bool) -> bool:
        self.skip_ws()
        for marker, state in ((self.CALL_BEGIN, "header"), (self.SECTION_END, "text")):
            if self.buf.startswith(marker):
                self.buf = self.buf[len(marker):]
                self.state = state
                return True
        if not self.buf or final:
            return False
        if any(m.startswith(self.buf) for m in (self.CALL_BEGIN, self.SECTION_END)):
            return False  # a marker still arriving
        self.state = "text"  # text in the section that is no call: the section is over
        return True

    def _on_header(self, final: bool) -> bool:
        m = self.HEADER.match(self.buf)
        if m is not None:
            if self.known(m.group(1).strip()):
                self.buf = self.buf[m.end():]
                self._start(m.group(1).strip())
                self._args_begun = False
                self.state = "args"
            else:
                self.state = "whole"
            return True
        if final or self.CALL_END in self.buf or len(self.buf) > MAX_HEADER_CHARS:
            self.state = "whole"
            return True
        return False

    def _on_args(self, final: bool) -> bool:
        text, marker = self.take_until(self.ARGS_ENDS, final)
        if not self._args_begun:
            text = text.lstrip()
            self._args_begun = bool(text)
        self._args(text)
        if marker is None and not final:
            return False
        self._end()
        self.state = "section"
        return marker is not None

    def _on_whole(self, final: bool) -> bool:
        return self._give_back(self.CALL_BEGIN, self.CALL_END, final, "section")


class SectionedJsonFormat(ToolCallFormat):
    """Grammar side: each format gives `call_rule(tool)` (from its CALL_BEGIN to its CALL_END)
    and the separator between calls."""

    separator: ClassVar[str] = ""  # a Lark expression between calls ("" for none)
    parser_class: ClassVar[type[SectionedJsonParser]]

    def parser(self, tools: list[ToolSpec]) -> StreamParser:
        return self.parser_class(tools)

    def call_rule(self, tool: ToolSpec) -> str:
        raise NotImplementedError

    def region(self, tools: list[ToolSpec], parallel_calls: bool) -> list[str]:
        rules = [f"call_{i}: {self.call_rule(tool)}" for i, tool in enumerate(tools)]
        call = "(" + " | ".join(f"call_{i}" for i in range(len(tools))) + ")"
        more = f" ({self.separator} {call})*" if parallel_calls else ""
        end = self.markup(self.parser_class.SECTION_END)
        return [f"region: {call}{more} {end}", *rules]
