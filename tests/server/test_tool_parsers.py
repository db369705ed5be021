"""The tool-call formats on recorded outputs of each model family: parsed whole, character by
character and token by token through the real detokenizer (same result; markup never in the
content; long arguments arrive in several fragments), malformed calls given back as text,
key/value arguments typed by the schema; and each format's forced-call grammar checked with
llguidance on the family's tokens (it accepts exactly the family's calls of the allowed tools,
with schema-valid arguments, and what it accepts parses back into those calls)."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config import _CHOICES, ConfigError, load_config
from appliance.server.detokenize import IncrementalDetokenizer
from appliance.server.tool_parsers import (FORMATS, Reasoning, ToolCallArgs, ToolCallEnd, ToolCallStart,
                                           ToolChoice, ToolSpec, detect_format, select_format)
from appliance.server.tool_parsers.key_value import typed_value

from .transcripts import BASH, READ, SPECIAL_TOKENS, TOOLS, TRANSCRIPTS, WRITE, Transcript, family_tokenizer, render


def run(fmt: str, pieces: list[str], tools: list[ToolSpec] = TOOLS) -> list:
    parser = FORMATS[fmt]().parser(tools)
    out = [p for piece in pieces for p in parser.feed(piece)]
    return out + parser.finish()


def summary(pieces: list) -> tuple[str, str, list[tuple[str, dict | None]]]:
    content = "".join(p for p in pieces if isinstance(p, str))
    reasoning = "".join(p.text for p in pieces if isinstance(p, Reasoning))
    calls = [(p.call.name, p.call.arguments) for p in pieces if isinstance(p, ToolCallEnd)]
    return content, reasoning, calls


def token_pieces(fmt: str, text: str) -> list[str]:
    """`text` as the detokenizer delivers it when the family's tokenizer generates it."""
    tokenizer = family_tokenizer(fmt)
    detok = IncrementalDetokenizer(tokenizer, keep_special=frozenset(FORMATS[fmt].markers))
    pieces = [detok.push(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    return pieces + [detok.flush()]


@pytest.mark.parametrize("t", TRANSCRIPTS, ids=lambda t: t.format)
def test_recorded_outputs_parse_the_same_whole_and_streamed(t: Transcript):
    expected = (t.content, t.reasoning, t.calls)
    whole = run(t.format, [t.text])
    assert summary(whole) == expected
    by_char = run(t.format, list(t.text))
    by_token = run(t.format, token_pieces(t.format, t.text))
    assert summary(by_char) == expected and summary(by_token) == expected
    for markup in FORMATS[t.format].markers:
        assert markup not in t.content
    for pieces in (by_char, by_token):
        starts = [p for p in pieces if isinstance(p, ToolCallStart)]
        ends = [p for p in pieces if isinstance(p, ToolCallEnd)]
        assert [s.name for s in starts] == [name for name, _ in t.calls]
        for end in ends:  # the fragments are the arguments, in order, between start and end
            fragments = [p.fragment for p in pieces if isinstance(p, ToolCallArgs) and p.index == end.index]
            assert "".join(fragments) == end.call.arguments_json
    if t.streamed_call is not None:
        fragments = [p for p in by_token if isinstance(p, ToolCallArgs) and p.index == t.streamed_call]
        assert len(fragments) > 3  # the arguments arrive while they are generated
        end_at = next(i for i, p in enumerate(by_token) if isinstance(p, ToolCallEnd) and p.index == t.streamed_call)
        assert all(by_token.index(f) < end_at for f in fragments)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(TRANSCRIPTS), st.lists(st.integers(1, 9), min_size=1, max_size=60))
def test_any_chunking_gives_the_same_result(t: Transcript, sizes: list[int]):
    pieces, pos = [], 0
    for size in sizes * (len(t.text) // sum(sizes) + 1):
        pieces.append(t.text[pos:pos + size])
        pos += size
    assert summary(run(t.format, pieces)) == (t.content, t.reasoning, t.calls)


@pytest.mark.parametrize("fmt, text", [
    ("hermes", '<tool_call>\n{"name": "Delete", "arguments": {"path": "/"}}\n</tool_call>'),  # not offered
    ("hermes", "<tool_call>{not json}</tool_call> after"),
    ("qwen3_coder", "<tool_call>\n<function=Delete>\n<parameter=p>\nx\n</parameter>\n</function>\n</tool_call>"),
    ("qwen3_coder", "<tool_call>\nno function here\n</tool_call>"),
    ("glm45", "<tool_call>Delete\n<arg_key>p</arg_key>\n<arg_value>x</arg_value>\n</tool_call>"),
    ("kimi_k2", "<|tool_calls_section_begin|><|tool_call_begin|>functions.Delete:0<|tool_call_argument_begin|>{}"
                "<|tool_call_end|><|tool_calls_section_end|>"),
    ("deepseek_v31", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>Delete<｜tool▁sep｜>{}<｜tool▁call▁end｜>"),
])
def test_a_malformed_call_is_given_back_as_text(fmt, text):
    for pieces in ([text], list(text)):
        out = run(fmt, pieces)
        assert not any(isinstance(p, (ToolCallStart, ToolCallEnd)) for p in out)
        content = "".join(p for p in out if isinstance(p, str))
        assert "Delete" in content or "not json" in content or "no function" in content


def test_hermes_scans_the_json_so_a_closing_tag_inside_a_string_is_text():
    args = {"file_path": "notes.md", "content": 'Close with "</tool_call>" and {braces}.'}
    text = render("hermes", [("Write", args)]) + "\nDone."
    assert summary(run("hermes", list(text))) == ("Done.", "", [("Write", args)])


def test_text_that_only_looks_like_markup_is_kept():
    assert summary(run("hermes", list("a < b and <tool is fine")))[0] == "a < b and <tool is fine"
    assert summary(run("kimi_k2", list("x <|tool_call y")))[0] == "x <|tool_call y"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_call_cut_off_by_the_length_limit_ends_with_partial_arguments(fmt):
    text = render(fmt, [("Write", WRITE)]).removesuffix("<|call|>")
    cut = text[:text.index("greet(")]  # inside the content string
    out = run(fmt, list(cut))
    ends = [p for p in out if isinstance(p, ToolCallEnd)]
    assert len(ends) == 1 and ends[0].call.name == "Write"
    assert "def " in ends[0].call.arguments_json
    if fmt not in ("qwen3_coder", "glm45"):  # those close the JSON they write themselves
        assert ends[0].call.arguments is None


@pytest.mark.parametrize("raw, schema, value", [
    ("5", {"type": "integer"}, 5), ("-12", {"type": "integer"}, -12), ("5.5", {"type": "integer"}, "5.5"),
    ("3.25", {"type": "number"}, 3.25), ("7", {"type": "number"}, 7),
    ("True", {"type": "boolean"}, True), ("false", {"type": "boolean"}, False),
    ("None", {"type": ["string", "null"]}, None), ('{"a": [1]}', {"type": "object"}, {"a": [1]}),
    ("[1, 2]", {"type": "array"}, [1, 2]), ("[1, 2]", {"type": "object"}, "[1, 2]"),
    ("123", {"type": "string"}, "123"), ("123", None, "123"),
    ("4", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 4), ("b", {"enum": ["a", "b"]}, "b"),
])
def test_key_value_arguments_are_typed_by_the_schema(raw, schema, value):
    assert typed_value(raw, schema) == value


# --- grammars -------------------------------------------------------------------------------------

def matcher(fmt: str, grammar: str) -> llguidance.LLMatcher:
    m = llguidance.LLMatcher(llguidance.hf.from_tokenizer(family_tokenizer(fmt)),
                             llguidance.grammar_from("lark", grammar))
    assert not m.is_error(), m.get_error()
    return m


def accepts(fmt: str, grammar: str, text: str) -> bool:
    """Whether the grammar lets the model generate exactly `text` (then stop)."""
    m = matcher(fmt, grammar)
    ids = family_tokenizer(fmt).encode(text, add_special_tokens=False)
    return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()


def grammar(fmt: str, choice: ToolChoice, parallel: bool = True, tools: list[ToolSpec] = TOOLS) -> str:
    tokens = frozenset(family_tokenizer(fmt).added_tokens_decoder[i].content
                       for i in family_tokenizer(fmt).added_tokens_decoder)
    return FORMATS[fmt](tokens).forced_call_grammar(tools, choice, parallel)


def calls_text(fmt: str, calls) -> str:
    text = render(fmt, calls)
    return text if fmt != "harmony" else "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant" + text


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_forced_call_grammar_accepts_exactly_the_allowed_calls(fmt):
    required = grammar(fmt, ToolChoice("required"))
    one_call = calls_text(fmt, [("Write", WRITE)])
    assert accepts(fmt, required, one_call)
    assert accepts(fmt, required, render(fmt, [("Read", READ)]))  # reasoning first is optional
    assert not accepts(fmt, required, "I would rather answer in text.")
    assert not accepts(fmt, required, render(fmt, [("Read", {"file_path": "/x", "limit": "many"})]))
    assert not accepts(fmt, required, render(fmt, [("Read", {"limit": 3})]))  # file_path is required
    named = grammar(fmt, ToolChoice("named", "Bash"))
    assert accepts(fmt, named, render(fmt, [("Bash", BASH)]))
    assert not accepts(fmt, named, one_call)
    if fmt != "harmony":  # a harmony call ends the turn: one per reply
        assert accepts(fmt, required, render(fmt, [("Write", WRITE), ("Bash", BASH)]))
        assert not accepts(fmt, grammar(fmt, ToolChoice("required"), parallel=False),
                           render(fmt, [("Write", WRITE), ("Bash", BASH)]))
    # what the grammar accepts parses back into the calls
    assert summary(run(fmt, [one_call.removesuffix("<|call|>")]))[2] == [("Write", WRITE)]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_auto_with_parallel_calls_off_allows_text_or_one_call(fmt):
    single = grammar(fmt, ToolChoice("auto"), parallel=False)
    if fmt == "harmony":
        assert accepts(fmt, single, "<|channel|>final<|message|>Just an answer.<|return|>")
        assert accepts(fmt, single, calls_text(fmt, [("Read", READ)]))
        assert not accepts(fmt, single, "<|channel|>final<|message|>Ans<|end|>" + render(fmt, [("Read", READ)]))
        return
    call = render(fmt, [("Read", READ)])
    assert accepts(fmt, single, "Just an answer, no tools.")
    assert accepts(fmt, single, call)
    assert accepts(fmt, single, "Let me look.\n" + call)
    assert not accepts(fmt, single, render(fmt, [("Read", READ), ("Bash", BASH)]))
    assert not accepts(fmt, single, call + "\n" + call)


@pytest.mark.parametrize("fmt", ["hermes", "kimi_k2"])
def test_a_response_format_replaces_free_text(fmt):
    tokens = frozenset(t.content for t in family_tokenizer(fmt).added_tokens_decoder.values())
    from appliance.server.tool_parsers.grammar import json_value

    g = FORMATS[fmt](tokens).forced_call_grammar(TOOLS, ToolChoice("auto"), True,
                                                 json_value({"type": "object", "required": ["x"]}))
    assert accepts(fmt, g, '{"x": 1}')
    assert not accepts(fmt, g, "free text")
    assert accepts(fmt, g, render(fmt, [("Read", READ)]))


# --- choosing the format ---------------------------------------------------------------------------

TEMPLATES = {  # the lines of each family's chat template that write a call
    "qwen3_coder": "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}{{- '<parameter=' + args_name + '>\\n' }}",
    "glm45": "{{ '\\n<tool_call>' + tc.name }}<arg_key>{{ k }}</arg_key>\\n<arg_value>{{ v }}</arg_value>",
    "kimi_k2": "<|tool_calls_section_begin|>{%- for tool_call in message['tool_calls'] -%}<|tool_call_begin|>"
               "{{ formatted_id }}<|tool_call_argument_begin|>",
    "deepseek_v3": "'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
                   "tool['function']['name'] + '\\n' + '```json' + '\\n'",
    "deepseek_v31": "'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>'",
    "harmony": "{{- '<|start|>assistant<|channel|>commentary to=' + tool_call.name + ' <|constrain|>json"
               "<|message|>' }}",
    "hermes": "{{- '<tool_call>\\n{\"name\": \"' }}",
}


@pytest.mark.parametrize("fmt", sorted(TEMPLATES))
def test_the_format_is_detected_from_the_chat_template(fmt):
    assert detect_format(TEMPLATES[fmt]).name == fmt


def test_auto_picks_hermes_for_the_tiny_model_and_the_key_overrides_it(tokenizer):
    assert select_format("auto", tokenizer).name == "hermes"
    assert select_format("glm45", tokenizer).name == "glm45"
    assert detect_format("{{ messages }}").name == "hermes"


def test_the_config_key_names_every_format():
    assert set(_CHOICES["server.tool_parser"]) == {"auto", *FORMATS}
    assert load_config(None, ["server.tool_parser=kimi_k2"]).server.tool_parser == "kimi_k2"
    with pytest.raises(ConfigError, match="server.tool_parser"):
        load_config(None, ["server.tool_parser=llama3"])


def test_special_tokens_of_each_family_are_its_markup():
    for fmt, tokens in SPECIAL_TOKENS.items():
        assert set(tokens) <= set(FORMATS[fmt].markers)
    assert json.loads(json.dumps(BASH)) == BASH
