"""Hermes / Qwen2.5 / Qwen3 (and the tiny model): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

The call is recognized once `{"name": "<tool>", "arguments": {` has been written; from there the
arguments object streams as the model writes it, up to the `}` that closes it (the JSON is
scanned, so `</tool_call>` inside a string argument does not end the call). A body in another shape (keys in another
order, arguments as a JSON string) is parsed whole at `</tool_call>`; one that is no call of an
offered tool is given back as text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from appliance.server.tool_parsers.base import JsonScanner, StreamParser, ToolSpec
from appliance.server.tool_parsers.format import ToolCallFormat
from appliance.server.tool_parsers.grammar import json_value

OPEN, CLOSE = "<tool_call>", "</tool_call>"
HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')
MAX_HEADER_CHARS = 1024  # a body whose header is not found by then is parsed whole at its end


def parse_body(body: str) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) of a whole `<tool_call>` body, or None when it is no call."""
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    return (obj["name"], arguments) if isinstance(arguments, dict) else None


class HermesParser(StreamParser):
    opener = OPEN
    def __init__(self, tools: list[ToolSpec]) -> None:
        super().__init__(tools)
        self._json = JsonScanner()

    def _on_header(self, final: bool) -> bool:
        m = HEADER.match(self.buf)
        if m is not None:
            name = _unescape(m.group(1))
            if self.known(name) and self.buf[m.end()] == "{":
                self._start(name)
                self.buf = self.buf[m.end():]
                self._json = JsonScanner()
                self.state = "args"
            else:
                self.state = "whole"
            return True
        if final or CLOSE in self.buf or len(self.buf) > MAX_HEADER_CHARS:
            self.state = "whole"
            return True
        return False

    def _on_args(self, final: bool) -> bool:
        """The arguments object, up to the `}` that closes it (found by scanning the JSON, so a
        `</tool_call>` inside a string is text); then the envelope's end."""
        end = self._json.feed(self.buf)
        if end < 0 and not final:
            self._args(self.buf)
            self.buf = ""
            return False
        if end < 0:  # cut off: the call ends with what was written
            self._args(self.buf.rstrip().removesuffix(CLOSE).rstrip().removesuffix("}"))
            self.buf = ""
        else:
            self._args(self.buf[:end])
            self.buf = self.buf[end:]
        self._end()
        self.state = "envelope"
        return True

    def _on_envelope(self, final: bool) -> bool:
        """After the arguments: the envelope's `}` (and any other keys) up to `</tool_call>`."""
        block = self.take_block(CLOSE, final)
        if block is None:
            return False
        self.state = "text"
        return block[1]

    def _on_whole(self, final: bool) -> bool:
        block = self.take_block(CLOSE, final)
        if block is None:
            return False
        body, closed = block
        parsed = parse_body(body)
        if parsed is not None and self.known(parsed[0]):
            self._whole_call(*parsed)
        else:
            self._text(OPEN + body + (CLOSE if closed else ""))
        self.state = "text"
        return closed


def _unescape(raw: str) -> str:
    try:
        return json.loads(f'"{raw}"')
    except ValueError:
        return raw


class Hermes(ToolCallFormat):
    name = "hermes"
    markers = (OPEN, CLOSE)
    opener = OPEN
    template_markers = (OPEN,)

    def parser(self, tools: list[ToolSpec]) -> StreamParser:
        return HermesParser(tools)

    def region(self, tools: list[ToolSpec], parallel_calls: bool) -> list[str]:
        rules = [f"call_{i}: \"\\n\" {json_value(_envelope(tool))} \"\\n\" {self.markup(CLOSE)}"
                 for i, tool in enumerate(tools)]
        return [self._calls([f"call_{i}" for i in range(len(tools))], '"\\n"', parallel_calls),
                *rules]


def _envelope(tool: ToolSpec) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.name},
                                             "arguments": tool.arguments_schema},
            "required": ["name", "arguments"], "additionalProperties": False}
