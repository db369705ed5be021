"""DeepSeek-V3.1 / V3.2-Exp: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`."""

from __future__ import annotations

import re

from appliance.server.tool_parsers.base import ToolSpec
from appliance.server.tool_parsers.deepseek_v3 import CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END, SEP
from appliance.server.tool_parsers.grammar import json_value, literal
from appliance.server.tool_parsers.sectioned import SectionedJsonFormat, SectionedJsonParser


class DeepSeekV31Parser(SectionedJsonParser):
    SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_END = SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_END
    HEADER = re.compile(r"\s*([^<]+?)\s*" + re.escape(SEP))
    ARGS_ENDS = (CALL_END,)


class DeepSeekV31(SectionedJsonFormat):
    name = "deepseek_v31"
    markers = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, SEP, CALL_END)
    opener = SECTION_BEGIN
    template_markers = (SECTION_BEGIN, SEP)
    parser_class = DeepSeekV31Parser

    def call_rule(self, tool: ToolSpec) -> str:
        m = self.markup
        return (f"{m(CALL_BEGIN)} {literal(tool.name)} {m(SEP)} "
                f"{json_value(tool.arguments_schema)} {m(CALL_END)}")
