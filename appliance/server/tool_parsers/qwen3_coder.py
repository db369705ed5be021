"""Qwen3-Coder: `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`.

The chat template writes a string value as it is and any other value as JSON (objects, arrays)
or Python text (`True`, `None`): values are typed by the tool's schema (`key_value`). The one
newline after `<parameter=KEY>` and the one before `</parameter>` belong to the markup.
"""

from __future__ import annotations

import re

from appliance.server.tool_parsers.base import StreamParser, ToolSpec
from appliance.server.tool_parsers.format import ToolCallFormat
from appliance.server.tool_parsers.grammar import json_value, literal, text_until
from appliance.server.tool_parsers.key_value import KeyValueCallParser, argument_rules, is_string_param

OPEN, CLOSE = "<tool_call>", "</tool_call>"
VALUE_END = "</parameter>"


class Qwen3CoderParser(KeyValueCallParser):
    OPEN, CLOSE = OPEN, CLOSE
    HEADER = re.compile(r"\s*<function=([^>\n]+)>\n?")
    ARG = re.compile(r"<parameter=([^>\n]+)>(\n?)")
    ARG_OPTIONAL_TAIL = True
    VALUE_ENDS = ("\n" + VALUE_END, VALUE_END)
    CALL_END = re.compile(r"</function>\s*</tool_call>|</tool_call>")


class Qwen3Coder(ToolCallFormat):
    name = "qwen3_coder"
    markers = (OPEN, CLOSE, "<function=", "</function>", "<parameter=", VALUE_END)
    opener = OPEN
    template_markers = (OPEN, "<function=", "<parameter=")

    def parser(self, tools: list[ToolSpec]) -> StreamParser:
        return Qwen3CoderParser(tools)

    def region(self, tools: list[ToolSpec], parallel_calls: bool) -> list[str]:
        rules = [f"STRING_VALUE: {text_until(chr(10) + VALUE_END + chr(10), [VALUE_END])}",
                 'FREE_KEY: /[^>\\n]+/',
                 'free_param: "<parameter=" FREE_KEY ">\\n" STRING_VALUE']
        for i, tool in enumerate(tools):
            params = argument_rules(i, tool, rules, _parameter, "free_param")
            rules.append(f'call_{i}: "\\n" {literal(f"<function={tool.name}>")} "\\n" {params} '
                         f'"</function>\\n" {self.markup(CLOSE)}')
        return [self._calls([f"call_{i}" for i in range(len(tools))], '"\\n"', parallel_calls),
                *rules]


def _parameter(key: str, schema: dict) -> str:
    value = "STRING_VALUE" if is_string_param(schema) else f'{json_value(schema)} "\\n{VALUE_END}\\n"'
    return f"{literal(f'<parameter={key}>' + chr(10))} {value}"
