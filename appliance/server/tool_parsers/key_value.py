"""Calls whose arguments are key/value markup, not JSON (qwen3_coder, glm45): the parser writes
the arguments' JSON itself. A string value streams as it is generated (escaped into a JSON
string); any other value is typed by the tool's JSON schema when it is complete ("5" -> 5 for an
integer parameter, "true" -> true, objects and arrays parsed), and kept as a string when it does
not parse as that type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, ClassVar

from appliance.server.tool_parsers.base import StreamParser, ToolSpec, json_string_body

MAX_HEADER_CHARS = 256
MAX_JUNK_CHARS = 4096  # text between arguments that is no tag: dropped past this


def schema_types(schema: dict[str, Any] | None) -> set[str]:
    """The JSON types a parameter schema admits (empty: it does not say)."""
    if not schema:
        return set()
    kind = schema.get("type")
    types = {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else set()
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or []:
            types |= schema_types(option if isinstance(option, dict) else None)
    if "enum" in schema and not types:
        types = {_json_type(v) for v in schema["enum"]}
    return types


def is_string_param(schema: dict[str, Any] | None) -> bool:
    types = schema_types(schema)
    return not types or types == {"string"}


def typed_value(raw: str, schema: dict[str, Any] | None) -> Any:
    """`raw` as the type the schema asks for, else as written (a string)."""
    types = schema_types(schema)
    text = raw.strip()
    if "null" in types and text in ("null", "None"):
        return None
    if "boolean" in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "integer" in types and re.fullmatch(r"-?\d+", text):
        return int(text)
    if "number" in types:
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            return int(number) if re.fullmatch(r"-?\d+", text) else number
    if types & {"object", "array"}:
        try:
            value = json.loads(text)
        except ValueError:
            return raw
        if _json_type(value) in types:
            return value
    return raw


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, dict):
        return "object"
    return "array" if isinstance(value, list) else "string"


def argument_rules(i: int, tool: ToolSpec, rules: list[str], argument: Callable[[str, dict[str, Any]], str],
                   free_argument: str) -> str:
    """Grammar of tool i's arguments: a rule `arg_<i>_<j>` per parameter (`argument(key, schema)`
    writes its markup), in the schema's order, optional ones optional; any number of
    `free_argument` for a schema without properties. Returns the sequence; appends the rules."""
    props = tool.arguments_schema.get("properties")
    if not isinstance(props, dict) or not props:
        return f"{free_argument}*"
    required = set(tool.arguments_schema.get("required") or [])
    parts = []
    for j, (key, schema) in enumerate(props.items()):
        rules.append(f"arg_{i}_{j}: {argument(key, schema if isinstance(schema, dict) else {})}")
        parts.append(f"arg_{i}_{j}" + ("" if key in required else "?"))
    return " ".join(parts)


class KeyValueCallParser(StreamParser):
    """`OPEN` header arguments... end `CLOSE`; a subclass gives the markup as class attributes."""

    OPEN: ClassVar[str]
    CLOSE: ClassVar[str]
    HEADER: ClassVar[re.Pattern[str]]  # at the call's start; group 1: the name
    ARG: ClassVar[re.Pattern[str]]  # an argument's opening; group 1: the key
    ARG_OPTIONAL_TAIL: ClassVar[bool] = False  # ARG ends optionally (a newline): wait for a char
    VALUE_ENDS: ClassVar[tuple[str, ...]]
    CALL_END: ClassVar[re.Pattern[str]]  # ends the arguments (through CLOSE, or up to it)

    def __init__(self, tools) -> None:
        super().__init__(tools)
        self.opener = self.OPEN
        self._num_args = 0
        self._key = ""
        self._value = ""

    def _on_header(self, final: bool) -> bool:
        m = self.HEADER.match(self.buf)
        if m is not None and (m.end() < len(self.buf) or final):
            name = m.group(1).strip()
            if not self.known(name):
                self.state = "whole"
                return True
            self.buf = self.buf[m.end():]
            self._start(name)
            self._args("{")
            self._num_args = 0
            self.state = "args"
            return True
        if final or self.CLOSE in self.buf or len(self.buf) > MAX_HEADER_CHARS:
            self.state = "whole"
            return True
        return False

    def _on_args(self, final: bool) -> bool:
        arg, end = self.ARG.search(self.buf), self.CALL_END.search(self.buf)
        if end is not None and (arg is None or end.start() < arg.start()):
            self.buf = self.buf[end.end():]
            self._close_call()
            return True
        if arg is not None and (arg.end() < len(self.buf) or not self.ARG_OPTIONAL_TAIL or final):
            self.buf = self.buf[arg.end():]
            self._open_arg(arg.group(1).strip())
            return True
        if final:
            self._close_call()
            return False
        if len(self.buf) > MAX_JUNK_CHARS:
            self.buf = self.buf[-MAX_HEADER_CHARS:]
        return False

    def _open_arg(self, key: str) -> None:
        self._key = key
        self._value = ""
        prefix = (", " if self._num_args else "") + json.dumps(key, ensure_ascii=False) + ": "
        self._num_args += 1
        if is_string_param(self._schema()):
            self._args(prefix + '"')
            self.state = "string_value"
        else:
            self._args(prefix)
            self.state = "typed_value"

    def _on_string_value(self, final: bool) -> bool:
        text, marker = self.take_until(self.VALUE_ENDS, final)
        self._args(json_string_body(text))
        if marker is None and not final:
            return False
        self._args('"')
        self.state = "args"
        return True

    def _on_typed_value(self, final: bool) -> bool:
        text, marker = self.take_until(self.VALUE_ENDS, final)
        self._value += text
        if marker is None and not final:
            return False
        self._args(json.dumps(typed_value(self._value, self._schema()), ensure_ascii=False))
        self.state = "args"
        return True

    def _schema(self) -> dict[str, Any] | None:
        tool = self.tools.get(self._call_name or "")
        return tool.param_schema(self._key) if tool else None

    def _close_call(self) -> None:
        self._args("}")
        self._end()
        self.state = "text"

    def _on_whole(self, final: bool) -> bool:
        return self._give_back(self.OPEN, self.CLOSE, final, "text")
