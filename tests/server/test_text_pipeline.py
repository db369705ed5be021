"""Incremental detokenization and stop strings, each on its own (the tool-call parsers:
test_tool_parsers.py)."""

from __future__ import annotations

import pytest

from appliance.server.detokenize import IncrementalDetokenizer
from appliance.server.stop_strings import StopStringMatcher

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


def test_detokenizer_keeps_the_special_tokens_it_is_told_to(tokenizer):
    ids = tokenizer.encode("a<|im_start|>b<|im_end|>", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, keep_special=frozenset({"<|im_start|>"}))
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "a<|im_start|>b"
