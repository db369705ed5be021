"""Kimi-K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>`.

IDX counts the calls of the whole conversation; the parser accepts any (and the bare name).
"""

from __future__ import annotations

import re

from appliance.server.tool_parsers.base import ToolSpec
from appliance.server.tool_parsers.grammar import json_value, literal
from appliance.server.tool_parsers.sectioned import SectionedJsonFormat, SectionedJsonParser

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


class KimiK2Parser(SectionedJsonParser):
    SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_END = SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_END
    HEADER = re.compile(r"\s*(?:functions\.)?([^\s:<]+)(?::\d+)?\s*" + re.escape(ARG_BEGIN))
    ARGS_ENDS = (CALL_END,)


class KimiK2(SectionedJsonFormat):
    name = "kimi_k2"
    markers = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END)
    opener = SECTION_BEGIN
    template_markers = (SECTION_BEGIN, ARG_BEGIN)
    parser_class = KimiK2Parser

    def call_rule(self, tool: ToolSpec) -> str:
        m = self.markup
        return (f"{m(CALL_BEGIN)} {literal(f'functions.{tool.name}:')} /[0-9]+/ {m(ARG_BEGIN)} "
                f"{json_value(tool.arguments_schema)} {m(CALL_END)}")
