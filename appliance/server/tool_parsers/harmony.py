"""GPT-OSS (the harmony format): messages on channels.

    <|channel|>analysis<|message|>REASONING<|end|>
    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>
    <|start|>assistant<|channel|>final<|message|>ANSWER<|return|>

The analysis channel is reasoning; a message to `functions.NAME` (the recipient may also stand
before the channel) is a call whose JSON arguments stream; the final channel, and commentary
without a recipient (a preamble), are content. `<|call|>` and `<|return|>` are end-of-sequence
tokens (not in the text): the output's end closes the last message. The format is parsed even
without tools, to keep reasoning out of the content.
"""

from __future__ import annotations

import re

from appliance.server.tool_parsers.base import StreamParser, ToolChoice, ToolSpec
from appliance.server.tool_parsers.format import ToolCallFormat
from appliance.server.tool_parsers.grammar import json_value, literal

START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
CONSTRAIN, CALL, RETURN = "<|constrain|>", "<|call|>", "<|return|>"
CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")
RECIPIENT = re.compile(r"to=([^\s<]+)")
FUNCTIONS = "functions."


class HarmonyParser(StreamParser):
    state = "header"

    def __init__(self, tools: list[ToolSpec]) -> None:
        super().__init__(tools)
        self._header = ""
        self._body = "text"  # text | reasoning | call
        self._opened = False  # a message header was read

    def _on_header(self, final: bool) -> bool:
        text, marker = self.take_until((MESSAGE,), final)
        self._header += text
        if marker is None:
            if not self._opened and (final or _plain(self._header)):
                self._text(self._header)  # output that opens with no header: content
                self._header = ""
            return False
        self._opened = True
        self._open_message(self._header)
        self._header = ""
        self.state = "body"
        return True

    def _open_message(self, header: str) -> None:
        channel = CHANNEL_NAME.search(header)
        recipient = RECIPIENT.search(header)
        name = recipient.group(1).removeprefix(FUNCTIONS) if recipient else ""
        if recipient and recipient.group(1).startswith(FUNCTIONS) and self.known(name):
            self._start(name)
            self._body = "call"
        elif channel and channel.group(1) == "analysis":
            self._body = "reasoning"
        else:
            self._body = "text"
        self.in_reasoning = self._body == "reasoning"

    def _on_body(self, final: bool) -> bool:
        text, marker = self.take_until((END, START), final)
        if self._body == "call":
            self._args(text)
        elif self._body == "reasoning":
            self._reasoning(text)
        else:
            self._text(text)
        if marker is None and not final:
            return False
        if self._body == "call":
            self._end()
        self.in_reasoning = False
        self.state = "header" if marker == START else "between"
        return marker is not None

    def _on_between(self, final: bool) -> bool:
        """After `<|end|>`: the next message's `<|start|>`."""
        text, marker = self.take_until((START,), final)
        if text.strip() and marker is None and final:
            self._text(text)
        if marker is None:
            return False
        self.state = "header"
        return True


def _plain(text: str) -> bool:
    """Text that cannot be the start of a header (which opens with `<|channel|>` or `to=`)."""
    head = text.lstrip()
    return bool(head) and not (CHANNEL.startswith(head[:len(CHANNEL)]) or head.startswith("to="))


class Harmony(ToolCallFormat):
    name = "harmony"
    markers = (START, CHANNEL, MESSAGE, END, CONSTRAIN, CALL, RETURN)
    opener = CHANNEL
    template_markers = (CHANNEL, MESSAGE, CONSTRAIN)
    always_parse = True

    def parser(self, tools: list[ToolSpec]) -> StreamParser:
        return HarmonyParser(tools)

    def region(self, tools: list[ToolSpec], parallel_calls: bool) -> list[str]:
        """A call ends the turn (`<|call|>`): one per reply, whatever `parallel_calls` says."""
        m = self.markup
        rules = [f"call_{i}: {m(CHANNEL)} {literal(f'commentary to={FUNCTIONS}{tool.name} ')} "
                 f'{m(CONSTRAIN)} "json" {m(MESSAGE)} {json_value(tool.arguments_schema)} {m(CALL)}'
                 for i, tool in enumerate(tools)]
        return ["call: " + " | ".join(f"call_{i}" for i in range(len(tools))), *rules]

    def forced_call_grammar(self, tools: list[ToolSpec], tool_choice: ToolChoice,
                            parallel_calls: bool, text_rule: str | None = None) -> str:
        """Reasoning first (optional), then the call, or for `auto` the call or a final answer
        (free text, or `text_rule`)."""
        allowed = tool_choice.allowed(tools)
        if not allowed:
            raise ValueError(f"tool_choice {tool_choice} allows none of the tools")
        m = self.markup
        reasoning, defs = m.text_then("ANALYSIS", END, list(self.markers))
        lines = [f'analysis: {m(CHANNEL)} "analysis" {m(MESSAGE)} {reasoning} {m(START)} "assistant"',
                 *defs, *self.region(allowed, parallel_calls)]
        if tool_choice.mode != "auto":
            return "\n".join(["start: analysis? call", *lines]) + "\n"
        if text_rule is None:
            answer, answer_defs = m.text_then("ANSWER", RETURN, list(self.markers))
        else:
            answer, answer_defs = f"{text_rule} {m(RETURN)}", []
        final = f'final: {m(CHANNEL)} "final" {m(MESSAGE)} {answer}'
        return "\n".join(["start: analysis? (call | final)", final, *answer_defs, *lines]) + "\n"

