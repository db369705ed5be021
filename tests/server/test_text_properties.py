"""Property tests: however the output is split into pieces, the text pipeline gives the same result."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.server.detokenize import IncrementalDetokenizer
from appliance.server.stop_strings import StopStringMatcher
from appliance.server.tool_parsers import ToolCallEnd, ToolSpec
from appliance.server.tool_parsers.hermes import HermesParser

TEXT = st.lists(st.sampled_from(list("ab <>/\n{}\":,_lotcé日🤖") + ["<tool_call>", "</tool_call>"]),
                max_size=30).map("".join)


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@given(TEXT, st.lists(st.integers(0, 60), max_size=12), st.sampled_from(["b<", "ab", "\n\n", "日🤖", "c"]))
def test_stop_strings_independent_of_chunking(text, cuts, stop):
    matcher = StopStringMatcher([stop])
    emitted, matched = [], None
    for piece in _split(text, cuts):
        out, matched = matcher.feed(piece)
        emitted.append(out)
        if matched:
            break
    if matched is None:
        emitted.append(matcher.flush())
    index = text.find(stop)
    assert "".join(emitted) == (text if index < 0 else text[:index])
    assert matched == (None if index < 0 else stop)


TOOLS = [ToolSpec("read"), ToolSpec("run_cmd"), ToolSpec("f")]


def _parse(pieces: list[str]) -> list:
    """Content (adjacent pieces merged) and the completed calls, in order."""
    parser = HermesParser(TOOLS)
    out: list = []
    for piece in pieces:
        out.extend(parser.feed(piece))
    out.extend(parser.finish())
    merged: list = []
    for item in out:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        elif isinstance(item, (str, ToolCallEnd)):
            merged.append(item.call if isinstance(item, ToolCallEnd) else item)
    return merged


CALL = st.builds(lambda name, value: f'<tool_call>\n{{"name": "{name}", "arguments": {{"k": "{value}"}}}}\n</tool_call>',
                 st.sampled_from(["read", "run_cmd"]), st.text(alphabet="abc日 ", max_size=5))


@given(st.lists(st.one_of(TEXT, CALL), max_size=5), st.lists(st.integers(0, 300), max_size=15))
def test_tool_parser_independent_of_chunking(parts, cuts):
    text = "".join(parts)
    whole = _parse([text])
    assert _parse(_split(text, cuts)) == whole
    for item in whole:
        if not isinstance(item, str):
            assert item.name in ("read", "run_cmd")


@given(st.lists(st.text(alphabet="xyz日🤖", max_size=4), min_size=1, max_size=4))
def test_complete_calls_never_leak_markup(contents):
    calls = "".join(f'<tool_call>{{"name": "f", "arguments": {{"v": "{c}"}}}}</tool_call>' for c in contents)
    out = _parse(list("Sure." + calls))
    assert out[0] == "Sure." and all(not isinstance(item, str) for item in out[1:])
    assert [item.arguments["v"] for item in out[1:]] == contents


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=40))
def test_detokenizer_streams_exactly_the_decoded_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False))
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)
