"""GLM-4.5 / 4.6 / 4.7: `<tool_call>NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>\\n...</tool_call>`.

The chat template writes a string value as it is and any other value as JSON: values are typed
by the tool's schema (`key_value`). GLM-4.7 writes the same markup without the newlines.
"""

from __future__ import annotations

import re

from appliance.server.tool_parsers.base import StreamParser, ToolSpec
from appliance.server.tool_parsers.format import ToolCallFormat
from appliance.server.tool_parsers.grammar import json_value, literal
from appliance.server.tool_parsers.key_value import KeyValueCallParser, argument_rules, is_string_param

OPEN, CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"


class Glm45Parser(KeyValueCallParser):
    OPEN, CLOSE = OPEN, CLOSE
    HEADER = re.compile(r"([^\n<]+)(?:\n|(?=<))")
    ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>", re.DOTALL)
    VALUE_ENDS = (VALUE_CLOSE,)
    CALL_END = re.compile(r"</tool_call>")
    lstrip_output = True


class Glm45(ToolCallFormat):
    name = "glm45"
    markers = (OPEN, CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE)
    opener = OPEN
    template_markers = (OPEN, KEY_OPEN, VALUE_OPEN)

    def parser(self, tools: list[ToolSpec]) -> StreamParser:
        return Glm45Parser(tools)

    def region(self, tools: list[ToolSpec], parallel_calls: bool) -> list[str]:
        m = self.markup
        string_value, rules = m.text_then("STRING_VALUE", VALUE_CLOSE, [VALUE_CLOSE])
        rules.append('FREE_KEY: /[^<]+/')
        rules.append(f'free_arg: {m(KEY_OPEN)} FREE_KEY {m(KEY_CLOSE)} "\\n" {m(VALUE_OPEN)} '
                     f'{string_value} "\\n"')
        for i, tool in enumerate(tools):
            args = argument_rules(i, tool, rules, lambda key, schema: self._argument(key, schema, string_value),
                                  "free_arg")
            rules.append(f'call_{i}: {literal(tool.name + chr(10))} {args} {m(CLOSE)}')
        return [self._calls([f"call_{i}" for i in range(len(tools))], '"\\n"', parallel_calls),
                *rules]

    def _argument(self, key: str, schema: dict, string_value: str) -> str:
        m = self.markup
        value = string_value if is_string_param(schema) else f"{json_value(schema)} {m(VALUE_CLOSE)}"
        return f'{m(KEY_OPEN)} {literal(key)} {m(KEY_CLOSE)} "\\n" {m(VALUE_OPEN)} {value} "\\n"'
