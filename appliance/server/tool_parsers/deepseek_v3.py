"""DeepSeek-V3 (0324): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>\\n...<｜tool▁calls▁end｜>`.

The arguments end at the code fence *and* the call's end token together, so a fence inside a
string argument (a README being written) does not cut them.
"""

from __future__ import annotations

import re

from appliance.server.tool_parsers.base import ToolSpec
from appliance.server.tool_parsers.grammar import json_value, literal
from appliance.server.tool_parsers.sectioned import SectionedJsonFormat, SectionedJsonParser

SECTION_BEGIN, SECTION_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, SEP, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
FENCE = "```"


class DeepSeekV3Parser(SectionedJsonParser):
    SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_END = SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_END
    HEADER = re.compile(r"[^<]*?" + re.escape(SEP) + r"\s*([^\n`<]+?)\s*```(?:json)?[ \t]*\n")
    ARGS_ENDS = ("\n" + FENCE + CALL_END, FENCE + CALL_END, CALL_END)


class DeepSeekV3(SectionedJsonFormat):
    name = "deepseek_v3"
    markers = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, SEP, CALL_END)
    opener = SECTION_BEGIN
    template_markers = (SECTION_BEGIN, SEP, "```json")
    separator = '"\\n"'
    parser_class = DeepSeekV3Parser

    def call_rule(self, tool: ToolSpec) -> str:
        m = self.markup
        return (f'{m(CALL_BEGIN)} "function" {m(SEP)} {literal(tool.name + chr(10) + FENCE + "json" + chr(10))} '
                f'{json_value(tool.arguments_schema)} {literal(chr(10) + FENCE)} {m(CALL_END)}')
