"""Incremental detokenization, stop strings and the tool-call parser, each on its own."""

from __future__ import annotations

import json

import pytest

from appliance.server.detokenize import IncrementalDetokenizer
from appliance.server.stop_strings import StopStringMatcher
from appliance.server.tool_calls import ParsedToolCall, ToolCallParser, parse_tool_call

MIXED = "Grüße, 日本語 and emoji 🤖🚀 — done. def f(x):\n    return x"


def _stream(tokenizer, text: str, prompt: str = "") -> list[str]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


def test_detokenizer_reassembles_multibyte_text_without_broken_chars(tokenizer):
    ids = tokenizer.encode(MIXED, add_special_tokens=False)
    single = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in single)  # the tokenizer really splits characters
    deltas = _stream(tokenizer, MIXED, prompt="<|im_start|>assistant\n")
    assert "".join(deltas) == MIXED
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_skips_special_tokens(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode("hi<|im_end|>", add_special_tokens=False)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "hi"


def test_detokenizer_keeps_tool_tags(tokenizer):
    text = '<tool_call>{"name": "x"}</tool_call>'
    assert "".join(_stream(tokenizer, text)) == text


def test_detokenizer_flush_emits_an_incomplete_character():
    class Bytes:  # a tokenizer whose tokens are single UTF-8 bytes
        def decode(self, ids, **_):
            return bytes(ids).decode("utf-8", errors="replace")

    detok = IncrementalDetokenizer(Bytes())
    data = "é".encode() + "日".encode()[:2]
    out = [detok.push(b) for b in data]
    assert out == ["", "é", "", ""]
    assert detok.flush() == "\ufffd"


@pytest.mark.parametrize("pieces, stops, expected_text, expected_stop", [
    (["Hello ", "wor", "ld", "!"], ["world"], "Hello ", "world"),
    (["ab", "c<", "/e", "nd>tail"], ["</end>"], "abc", "</end>"),
    (["no stop here"], ["zzz"], "no stop here", None),
    (["x", "STO", "P"], ["STOP", "TOP"], "x", "STOP"),
    (["a", "b"], [], "ab", None),
])
def test_stop_strings_across_pieces(pieces, stops, expected_text, expected_stop):
    matcher = StopStringMatcher(stops)
    emitted, matched = [], None
    for piece in pieces:
        text, matched = matcher.feed(piece)
        emitted.append(text)
        if matched:
            break
    if matched is None:
        emitted.append(matcher.flush())
    assert "".join(emitted) == expected_text
    assert matched == expected_stop


def test_stop_strings_hold_back_only_possible_prefixes():
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("abc#") == ("abc", None)
    assert matcher.feed("#x") == ("##x", None)


def _parse(pieces: list[str]) -> list:
    parser = ToolCallParser()
    out = []
    for piece in pieces:
        out.extend(parser.feed(piece))
    return out + parser.finish()


def _chars(text: str) -> list[str]:
    return list(text)


def test_tool_call_parsed_from_character_stream_without_markup():
    text = 'Let me look.\n<tool_call>\n{"name": "read_file", "arguments": {"path": "a.py"}}\n</tool_call>'
    out = _parse(_chars(text))
    content = "".join(p for p in out if isinstance(p, str))
    calls = [p for p in out if isinstance(p, ParsedToolCall)]
    assert content == "Let me look."
    assert calls == [ParsedToolCall("read_file", {"path": "a.py"})]
    assert "<" not in content


def test_two_tool_calls_and_whitespace_between():
    one = '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
    two = '<tool_call>{"name": "b", "arguments": "{\\"k\\": 1}"}</tool_call>'
    out = _parse(["\n", one, "\n\n", two, "\n"])
    assert out == [ParsedToolCall("a", {}), ParsedToolCall("b", {"k": 1})]


def test_malformed_tool_call_becomes_plain_text():
    text = "<tool_call>{not json}</tool_call> after"
    out = _parse(_chars(text))
    assert all(isinstance(p, str) for p in out)
    assert "".join(out) == text


def test_unclosed_tool_call_at_end_is_still_a_call():
    out = _parse(['<tool_call>\n{"name": "run", "arguments": {"cmd": "ls"}}\n'])
    assert out == [ParsedToolCall("run", {"cmd": "ls"})]


def test_text_that_only_looks_like_a_tag_is_kept():
    out = _parse(_chars("a < b and <tool is fine"))
    assert "".join(out) == "a < b and <tool is fine"


def test_parse_tool_call_rejects_non_calls():
    assert parse_tool_call('{"arguments": {}}') is None
    assert parse_tool_call('["name"]') is None
    assert parse_tool_call('{"name": "x", "arguments": 3}') is None
    assert json.loads(parse_tool_call('{"name": "x", "arguments": {"q": "ü"}}').arguments_json) == {"q": "ü"}
