"""What every tool-call format shares: the tools a request offers, the pieces a streaming parser
emits, and `StreamParser`, the base each format's parser builds on.

A parser is fed the model's text as it is detokenized and returns, in output order: content
strings, `Reasoning` text, and for each call a `ToolCallStart` (as soon as its name is known),
`ToolCallArgs` fragments of the arguments' JSON (as they are generated) and a `ToolCallEnd`.
Text that may be the start of a call's markup is held back until it is known; a call whose
header (its name) is malformed or names no offered tool is given back as text. Once a call has
started its arguments stream as written: `ParsedToolCall.arguments` is None when they did not
end as a JSON object (the model broke them, or the output was cut off).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal


@dataclass(frozen=True)
class ToolSpec:
    """A function the request offers: its name and the JSON schema of its arguments."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)

    def param_schema(self, key: str) -> dict[str, Any] | None:
        props = self.parameters.get("properties")
        schema = props.get(key) if isinstance(props, dict) else None
        return schema if isinstance(schema, dict) else None

    @property
    def arguments_schema(self) -> dict[str, Any]:
        return self.parameters or {"type": "object"}


@dataclass(frozen=True)
class ToolChoice:
    """Either API's tool_choice, normalized: `auto`, `required` (OpenAI) / `any` (Anthropic),
    or one named function (OpenAI `{"type": "function", ...}` / Anthropic `{"type": "tool"}`).
    A choice of "none" turns tools off before a parser is made."""

    mode: Literal["auto", "required", "named"] = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        """The grammar allows calls only: no text, before or between them."""
        return self.mode != "auto"

    def allowed(self, tools: list[ToolSpec]) -> list[ToolSpec]:
        return [t for t in tools if t.name == self.name] if self.mode == "named" else tools


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments_json: str  # the concatenated ToolCallArgs fragments

    @cached_property
    def arguments(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.arguments_json) if self.arguments_json.strip() else {}
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    index: int
    fragment: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    call: ParsedToolCall


Piece = str | Reasoning | ToolCallStart | ToolCallArgs | ToolCallEnd


def partial_suffix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def json_string_body(text: str) -> str:
    """`text` escaped as the inside of a JSON string (escaping is per character, so fragments
    escaped one by one concatenate to the escape of the whole)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


class JsonScanner:
    """Finds where a JSON value that starts with `{` or `[` ends, fed in pieces: tracks nesting
    outside strings (and escapes inside them)."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> int:
        """The index in `text` just past the value's end, or -1 while it is still open."""
        for i, c in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return -1


class StreamParser:
    """Base of every format's parser: a text buffer with scanning helpers, and the pieces out.

    A subclass is a state machine: `_on_<state>(final)` consumes what it can of `self.buf`,
    emits through `_text`, `_reasoning`, `_start`, `_args` and `_end`, sets `self.state` and
    returns whether to go on; `final` is set once, when the output has ended (hold nothing
    back)."""

    def __init__(self, tools: list[ToolSpec]) -> None:
        self.tools = {tool.name: tool for tool in tools}
        self.buf = ""
        self.num_calls = 0
        self.cut_call = False  # the output ended inside a call: its arguments are no JSON object
        self._finishing = False
        self.in_reasoning = False  # the text being generated is reasoning (for token counts)
        self._out: list[Piece] = []
        self._pending_ws = ""  # trailing whitespace of the content, held until we know more
        self._after_call = False
        self._started = False  # content was emitted
        self._call_name: str | None = None
        self._call_args: list[str] = []

    def feed(self, text: str) -> list[Piece]:
        self.buf += text
        self._parse(final=False)
        return self._drain()

    def finish(self) -> list[Piece]:
        self._finishing = True   # a call the output's end closes was cut off (`_end`)
        self._parse(final=True)
        if self._call_name is not None:  # cut off inside a call's arguments
            self._end()
        if self._pending_ws and not self.num_calls:
            self._out.append(self._pending_ws)
        self._pending_ws = ""
        return self._drain()

    state = "text"  # a subclass's initial state; `_on_<state>(final)` handles each
    opener = ""  # the marker that ends text: markup begins (for the default `_on_text`)
    after_opener = "header"  # the state the opener leads to
    lstrip_output = False  # whitespace opening the output is the template's (GLM: a newline)

    def _parse(self, final: bool) -> None:
        """Run state handlers while they make progress (a handler returns False to wait)."""
        while getattr(self, f"_on_{self.state}")(final):
            pass

    def _on_text(self, final: bool) -> bool:
        """Content up to the opener (held back while it may be the opener's start)."""
        text, marker = self.take_until((self.opener,), final)
        self._text(text)
        if marker is None:
            return False
        self.state = self.after_opener
        return True

    def _give_back(self, begin: str, end: str, final: bool, then: str) -> bool:
        """A call that is none (a malformed header, no offered tool): its markup through `end`
        goes out as text; then state `then`."""
        block = self.take_block(end, final)
        if block is None:
            return False
        body, closed = block
        self._text(begin + body + (end if closed else ""))
        self.state = then
        return closed

    def _drain(self) -> list[Piece]:
        out, self._out = self._out, []
        return out

    # --- scanning -------------------------------------------------------------------------------
    def take_until(self, markers: tuple[str, ...], final: bool) -> tuple[str, str | None]:
        """Consume the buffer up to and including the earliest of `markers`: (text before it,
        the marker). Without one: (the text that cannot start a marker, None); the rest stays
        (all of it is taken when `final`)."""
        found = [(i, m) for m in markers if (i := self.buf.find(m)) >= 0]
        if found:
            i, marker = min(found, key=lambda f: (f[0], -len(f[1])))
            text, self.buf = self.buf[:i], self.buf[i + len(marker):]
            return text, marker
        keep = 0 if final else max(partial_suffix_len(self.buf, m) for m in markers)
        cut = len(self.buf) - keep
        text, self.buf = self.buf[:cut], self.buf[cut:]
        return text, None

    def take_block(self, end: str, final: bool) -> tuple[str, bool] | None:
        """The text up to `end` (consumed with it) and True; at the end of the output all that
        is left and False; else None (wait for more, nothing consumed)."""
        i = self.buf.find(end)
        if i >= 0:
            body, self.buf = self.buf[:i], self.buf[i + len(end):]
            return body, True
        if final:
            body, self.buf = self.buf, ""
            return body, False
        return None

    def skip_ws(self) -> None:
        self.buf = self.buf.lstrip()

    def known(self, name: str) -> bool:
        return name in self.tools

    # --- output ---------------------------------------------------------------------------------
    def _text(self, text: str) -> None:
        """Content; whitespace that only separates content from calls is dropped."""
        if self._after_call or (self.lstrip_output and not self._started):
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        self._started = True
        full = self._pending_ws + text
        content = full.rstrip()
        self._pending_ws = full[len(content):]
        if content:
            self._out.append(content)

    def _reasoning(self, text: str) -> None:
        if text:
            self._out.append(Reasoning(text))

    def _start(self, name: str) -> None:
        self._pending_ws = ""
        self._call_name = name
        self._call_args = []
        self._out.append(ToolCallStart(self.num_calls, name))

    def _args(self, fragment: str) -> None:
        if fragment and self._call_name is not None:
            self._call_args.append(fragment)
            self._out.append(ToolCallArgs(self.num_calls, fragment))

    def _end(self) -> None:
        assert self._call_name is not None
        call = ParsedToolCall(self._call_name, "".join(self._call_args))
        self.cut_call = self.cut_call or (self._finishing and call.arguments is None)
        self._out.append(ToolCallEnd(self.num_calls, call))
        self.num_calls += 1
        self._call_name = None
        self._after_call = True

    def _whole_call(self, name: str, arguments: dict[str, Any]) -> None:
        """A call parsed at once (not streamed): start, all arguments, end."""
        self._start(name)
        self._args(json.dumps(arguments, ensure_ascii=False))
        self._end()
