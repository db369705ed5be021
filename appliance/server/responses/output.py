"""Generation events -> Responses output items (reasoning, message, function_call) and the
stream events that build them, in the order the OpenAI spec gives:

    output_item.added, content_part.added, output_text.delta..., output_text.done,
    content_part.done, output_item.done                                  (a message)
    output_item.added, content_part.added, reasoning_text.delta..., reasoning_text.done,
    content_part.done, output_item.done                                  (reasoning)
    output_item.added, function_call_arguments.delta..., function_call_arguments.done,
    output_item.done                                                     (a function call)

An item opens with its first piece and closes when another kind begins or the output ends.
Stream events are dicts without `sequence_number` (the writer numbers them).
"""

from __future__ import annotations

import uuid
from typing import Any

from appliance.server.generation import Collected, TextDelta
from appliance.server.tool_parsers import Reasoning, ToolCallArgs, ToolCallEnd, ToolCallStart

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputBuilder:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []  # closed items, and the open one last
        self._open: dict[str, Any] | None = None
        self._text = ""  # the open message's or reasoning's text

    def on(self, event: object) -> list[Event]:
        if isinstance(event, TextDelta):
            return self._ensure("message") + [self._part_delta("response.output_text.delta", event.text,
                                                               logprobs=[])]
        if isinstance(event, Reasoning):
            return self._ensure("reasoning") + [self._part_delta("response.reasoning_text.delta", event.text)]
        if isinstance(event, ToolCallStart):
            item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                    "call_id": new_id("call"), "name": event.name}
            return self.close() + self._add(item)
        if isinstance(event, ToolCallArgs) and self._open is not None:
            self._open["arguments"] += event.fragment
            return [{"type": "response.function_call_arguments.delta", "item_id": self._open["id"],
                     "output_index": self._index, "delta": event.fragment}]
        if isinstance(event, ToolCallEnd):
            return self.close()
        return []

    def close(self, status: str = "completed") -> list[Event]:
        """Close the open item (`incomplete` when the output was cut off)."""
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        index = len(self.items) - 1
        events: list[Event] = []
        if item["type"] == "function_call":
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": index, "arguments": item["arguments"], "name": item["name"]})
        else:
            part = _part(item["type"], self._text)
            item["content"] = [part]
            text_done = {"message": "response.output_text.done", "reasoning": "response.reasoning_text.done"}
            done = {"type": text_done[item["type"]], "item_id": item["id"], "output_index": index,
                    "content_index": 0, "text": self._text}
            events += [{**done, "logprobs": []} if item["type"] == "message" else done,
                       {"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "part": part}]
        return events + [{"type": "response.output_item.done", "output_index": index, "item": item}]

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def _ensure(self, kind: str) -> list[Event]:
        if self._open is not None and self._open["type"] == kind:
            return []
        events = self.close()
        self._text = ""
        if kind == "message":
            item = {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
        else:
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                    "status": "in_progress"}
        events += self._add(item)
        return events + [{"type": "response.content_part.added", "item_id": item["id"],
                          "output_index": self._index, "content_index": 0, "part": _part(kind, "")}]

    def _add(self, item: dict[str, Any]) -> list[Event]:
        self.items.append(item)
        self._open = item
        return [{"type": "response.output_item.added", "output_index": self._index,
                 "item": {**item, "content": []} if "content" in item else dict(item)}]

    def _part_delta(self, kind: str, text: str, **extra: Any) -> Event:
        assert self._open is not None
        self._text += text
        return {"type": kind, "item_id": self._open["id"], "output_index": self._index,
                "content_index": 0, "delta": text, **extra}


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "message":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "reasoning_text", "text": text}


def whole_output(result: Collected, status: str) -> list[dict[str, Any]]:
    """The output items of a generation collected whole: reasoning, the message, the calls,
    then a message of the text written after them (the items a stream of it makes)."""
    builder = OutputBuilder()
    events: list[object] = []
    if result.reasoning:
        events.append(Reasoning(result.reasoning))
    before, after = result.text_around_calls()
    if before or not result.tool_calls:
        events.append(TextDelta(before))
    for i, call in enumerate(result.tool_calls):
        events += [ToolCallStart(i, call.name), ToolCallArgs(i, call.arguments_json), ToolCallEnd(i, call)]
    if after:
        events.append(TextDelta(after))
    for event in events:
        builder.on(event)
    builder.close(status)
    return builder.items
