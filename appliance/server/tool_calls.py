"""Streaming parser for Hermes/Qwen-style tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Markup never reaches the content: text that may be the start of `<tool_call>` is held back, the body
of a call is buffered until `</tool_call>` (or the end of the output) and then emitted as one parsed
call. A body that is not a JSON object with a `name` is given back as plain text. Whitespace that
only separates content from calls (the model's newlines around the tags) is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


Piece = str | ParsedToolCall


def parse_tool_call(body: str) -> ParsedToolCall | None:
    """The call in a tag's body, or None when the body is not a well-formed call."""
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
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(obj["name"], arguments)


def partial_suffix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ToolCallParser:
    """Feed text deltas; get back content strings and `ParsedToolCall`s in output order."""

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False
        self._pending_ws = ""  # trailing whitespace of the content, held until we know more
        self._after_call = False
        self.num_calls = 0

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        self._buffer += text
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        if self._inside:
            self._emit_call(self._buffer, out, closed=False)
        else:
            self._emit_text(self._buffer, out)
        self._buffer = ""
        self._inside = False
        if self._pending_ws and not self.num_calls:
            out.append(self._pending_ws)
        self._pending_ws = ""
        return out

    def _step(self, out: list[Piece]) -> bool:
        """Consume one tag transition from the buffer; False when more text is needed."""
        if self._inside:
            end = self._buffer.find(CLOSE_TAG)
            if end < 0:
                return False
            body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE_TAG):]
            self._inside = False
            self._emit_call(body, out, closed=True)
            return True
        start = self._buffer.find(OPEN_TAG)
        if start < 0:
            keep = partial_suffix_len(self._buffer, OPEN_TAG)
            cut = len(self._buffer) - keep
            self._emit_text(self._buffer[:cut], out)
            self._buffer = self._buffer[cut:]
            return False
        self._emit_text(self._buffer[:start], out)
        self._buffer = self._buffer[start + len(OPEN_TAG):]
        self._inside = True
        return True

    def _emit_call(self, body: str, out: list[Piece], closed: bool) -> None:
        call = parse_tool_call(body)
        if call is None:
            self._emit_text(OPEN_TAG + body + (CLOSE_TAG if closed else ""), out)
            return
        self._pending_ws = ""
        self._after_call = True
        self.num_calls += 1
        out.append(call)

    def _emit_text(self, text: str, out: list[Piece]) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        full = self._pending_ws + text
        content = full.rstrip()
        self._pending_ws = full[len(content):]
        if content:
            out.append(content)
