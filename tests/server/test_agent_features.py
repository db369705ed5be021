"""What coding agents rely on, through the real SDKs against the app (fake engine): n choices,
cached-token usage equal to the /metrics prefix-cache counter, enforced tool_choice and
response formats sent to the engine as constraints, a Claude-Code-style /v1/messages loop, an
interrupted Anthropic stream that never looks complete, Anthropic's context-length wording, API
keys, and every tool-call format streamed through both APIs."""

from __future__ import annotations

import json

import anthropic
import llguidance
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.server.tool_parsers import FORMATS

from .conftest import MODEL, serve_in_thread
from .transcripts import TRANSCRIPTS, family_tokenizer

OPENAI_TOOLS = [{"type": "function", "function": {
    "name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                        "required": ["path"]}}}]
ANTHROPIC_TOOLS = [
    {"name": "Read", "description": "Read a file", "input_schema": {
        "type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}},
    {"name": "Bash", "description": "Run a command", "input_schema": {
        "type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
        "required": ["command"]}, "cache_control": {"type": "ephemeral"}},
]
READ_CALL = ('Reading it.\n<tool_call>\n{"name": "read_file", "arguments": {"path": "src/main.py"}}\n</tool_call>')


@pytest.fixture()
def oai(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture()
def claude(served) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.base_url, api_key="unused", max_retries=0)


def cache_hits(served) -> float:
    """The prefix-cache counter /metrics shows."""
    with served.http() as http:
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    return families["tokenspeed_prefix_cache_hit_tokens"].samples[0].value


def compiles(constraint) -> bool:
    grammar = llguidance.LLMatcher.grammar_from_lark(constraint.spec)
    return llguidance.LLMatcher.validate_grammar(grammar) == ""


# --- n choices ------------------------------------------------------------------------------------

def generated(served) -> int:
    return served.fake.totals["generation_tokens_total"]


def test_n_choices_not_streamed_each_with_its_seed(oai, served):
    before = generated(served)
    out = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.message.content == "Hello from the fake engine." for c in out.choices)
    assert sorted(r.seed for r in served.fake.requests) == [7, 8, 9]
    assert out.usage.completion_tokens == generated(served) - before
    assert out.usage.prompt_tokens == len(served.fake.requests[0].prompt_ids)
    completions = oai.completions.create(model=MODEL, prompt="once", n=2, max_tokens=4)
    assert [c.index for c in completions.choices] == [0, 1]


def test_n_choices_streamed_carry_their_index(oai, served):
    served.fake.delay_s = 0.002
    before = generated(served)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                              stream=True, stream_options={"include_usage": True}))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == "Hello from the fake engine."
        assert mine[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == generated(served) - before
    assert {r.seed for r in served.fake.requests} == {None}


# --- cached tokens -----------------------------------------------------------------------------------

def test_openai_usage_reports_the_prefix_cache_hits(oai, served):
    messages = [{"role": "system", "content": "You are a careful coding agent. " * 8},
                {"role": "user", "content": "Summarize the repository layout."}]
    before = cache_hits(served)
    first = oai.chat.completions.create(model=MODEL, messages=messages)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the tests?"}]
    second = oai.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                         stream_options={"include_usage": True})
    usage = list(second)[-1].usage
    assert usage.prompt_tokens_details.cached_tokens > 0
    assert usage.prompt_tokens_details.cached_tokens == cache_hits(served) - before


def test_claude_code_style_loop_with_tools_and_cache_control(claude, served, tokenizer):
    """Three turns: a tool call, its result, the answer. Turns 2 and 3 reuse the conversation's
    KV: cache_read_input_tokens > 0, equal to what the /metrics counter moved by, and with
    input_tokens the whole prompt."""
    served.fake.scripts[:] = [
        'Let me look.\n<tool_call>\n{"name": "Read", "arguments": {"file_path": "/repo/app.py"}}\n</tool_call>',
        '<tool_call>\n{"name": "Bash", "arguments": {"command": "pytest -q", "timeout": 60}}\n</tool_call>',
        "All 12 tests pass."]
    system = [{"type": "text", "text": "You are Claude Code. " * 10, "cache_control": {"type": "ephemeral"}}]
    messages: list = [{"role": "user", "content": [{"type": "text", "text": "Run the tests.",
                                                    "cache_control": {"type": "ephemeral"}}]}]
    usages = []
    for turn in range(3):
        before = cache_hits(served)
        with claude.messages.stream(model=MODEL, max_tokens=200, system=system, tools=ANTHROPIC_TOOLS,
                                    messages=messages, metadata={"user_id": "user_1_account_2_session_abc"}) as s:
            final = s.get_final_message()
        usage = final.usage
        usages.append(usage)
        prompt = served.fake.requests[-1].prompt_ids
        assert usage.input_tokens + usage.cache_read_input_tokens == len(prompt)
        assert usage.cache_creation_input_tokens == 0
        assert usage.cache_read_input_tokens == cache_hits(served) - before
        assert served.fake.requests[-1].session == "abc"
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]})
        if turn < 2:
            assert final.stop_reason == "tool_use"
            call = final.content[-1]
            messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                          "content": f"output of {call.name}",
                                                          "cache_control": {"type": "ephemeral"}}]})
    assert final.stop_reason == "end_turn" and final.content[-1].text == "All 12 tests pass."
    assert usages[0].cache_read_input_tokens == 0
    assert usages[1].cache_read_input_tokens > 0 and usages[2].cache_read_input_tokens > usages[1].cache_read_input_tokens
    assert "output of Read" in tokenizer.decode(served.fake.requests[-1].prompt_ids)


# --- constraints -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, kind", [
    ({}, None),
    ({"tool_choice": "required"}, "lark"),
    ({"tool_choice": {"type": "function", "function": {"name": "read_file"}}}, "lark"),
    ({"parallel_tool_calls": False}, "lark"),
    ({"tool_choice": "none"}, None),
    ({"response_format": {"type": "json_object"}}, "lark"),  # tools too: a JSON answer or a call
])
def test_openai_tool_choice_becomes_a_constraint(oai, served, extra, kind):
    served.fake.reply = READ_CALL
    out = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                      tools=OPENAI_TOOLS, **extra)
    constraint = served.fake.requests[-1].constraint
    assert (constraint.kind if constraint else None) == kind
    if constraint:
        assert compiles(constraint) and "read_file" in constraint.spec
    assert out.choices[0].finish_reason == ("stop" if extra.get("tool_choice") == "none" else "tool_calls")


def test_response_formats_without_tools(oai, served):
    served.fake.reply = '{"answer": 42}'
    oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                response_format={"type": "json_object"})
    assert served.fake.requests[-1].constraint.kind == "json_object"
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    out = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "a", "schema": schema}})
    constraint = served.fake.requests[-1].constraint
    assert constraint.kind == "json_schema" and json.loads(constraint.spec) == schema
    assert json.loads(out.choices[0].message.content) == {"answer": 42}


@pytest.mark.parametrize("choice, kind, name", [
    (None, None, None), ({"type": "auto"}, None, None), ({"type": "any"}, "lark", None),
    ({"type": "tool", "name": "Bash"}, "lark", "Bash"),
    ({"type": "auto", "disable_parallel_tool_use": True}, "lark", None), ({"type": "none"}, None, None),
])
def test_anthropic_tool_choice_becomes_a_constraint(claude, served, choice, kind, name):
    served.fake.reply = '<tool_call>\n{"name": "Bash", "arguments": {"command": "ls"}}\n</tool_call>'
    extra = {"tool_choice": choice} if choice else {}
    message = claude.messages.create(model=MODEL, max_tokens=50, tools=ANTHROPIC_TOOLS,
                                     messages=[{"role": "user", "content": "x"}], **extra)
    constraint = served.fake.requests[-1].constraint
    assert (constraint.kind if constraint else None) == kind
    if constraint:
        assert compiles(constraint)
        assert ('"Read"' in constraint.spec) == (name is None)
    assert message.stop_reason == ("end_turn" if choice == {"type": "none"} else "tool_use")


def test_finish_reason_says_tool_calls_only_when_a_call_was_made(oai, served):
    served.fake.reply = "No tool needed."
    out = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=OPENAI_TOOLS)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.tool_calls is None
    served.fake.reply = READ_CALL
    out = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=OPENAI_TOOLS,
                                      max_tokens=12)  # cut inside the call
    assert out.choices[0].finish_reason == "length"
    # a stop string inside the call's arguments cuts it too (QA: was "tool_calls" with the
    # arguments not JSON); one after a whole call leaves it made
    out = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=OPENAI_TOOLS,
                                      stop=["main"])
    assert out.choices[0].finish_reason == "stop"
    served.fake.reply = READ_CALL + "\nDone."
    out = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=OPENAI_TOOLS,
                                      stop=["Done"])
    assert out.choices[0].finish_reason == "tool_calls"
    assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {"path": "src/main.py"}


# --- Anthropic streams and errors ---------------------------------------------------------------------

def test_anthropic_tool_input_streams_as_json_deltas(claude, served):
    served.fake.reply = ('On it.\n<tool_call>\n{"name": "Bash", "arguments": {"command": "pytest -q tests/server", '
                         '"timeout": 300}}\n</tool_call>')
    with claude.messages.stream(model=MODEL, max_tokens=100, tools=ANTHROPIC_TOOLS,
                                messages=[{"role": "user", "content": "test"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    deltas = [e.delta.partial_json for e in events if e.type == "content_block_delta"
              and e.delta.type == "input_json_delta"]
    assert len(deltas) > 3 and json.loads("".join(deltas)) == {"command": "pytest -q tests/server", "timeout": 300}
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["text", "tool_use"]
    assert final.content[1].input == {"command": "pytest -q tests/server", "timeout": 300}
    assert final.stop_reason == "tool_use"


def test_an_interrupted_anthropic_stream_never_ends_as_end_turn(claude, served):
    served.fake.reply = '<tool_call>\n{"name": "Bash", "arguments": {"command": "a long command line"}}\n</tool_call>'
    with claude.messages.stream(model=MODEL, max_tokens=8, tools=ANTHROPIC_TOOLS,
                                messages=[{"role": "user", "content": "x"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens"  # the cut-off tool input does not look complete
    served.fake.reply, served.fake.abort_after = "the server shuts down mid-answer", 3
    with served.http() as http, http.stream("POST", "/v1/messages", json={
            "model": MODEL, "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-2] == "event: error" and "end_turn" not in "\n".join(lines)
    with pytest.raises(anthropic.APIStatusError) as e:
        claude.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503


def test_anthropic_context_errors_use_anthropics_wording(claude, served):
    long = "word " * 5000
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": long}])
    error = e.value.body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("prompt is too long: ") and error["message"].endswith(" tokens > 4095 maximum")
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=4090, messages=[{"role": "user", "content": "hi"}])
    message = e.value.body["error"]["message"]
    assert message.startswith("input length and `max_tokens` exceed context limit: ")
    assert "+ 4090 > 4096, decrease input length or `max_tokens` and try again" in message


def test_either_correct_key_passes(served_with_key):
    with served_with_key.http() as http:
        body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        for headers, status in [
            ({"authorization": "Bearer sekrit", "x-api-key": "wrong"}, 200),
            ({"authorization": "Bearer wrong", "x-api-key": "sekrit"}, 200),
            ({"authorization": "Bearer wrong", "x-api-key": "also-wrong"}, 401),
            ({}, 401),
        ]:
            assert http.post("/v1/messages", json=body, headers=headers).status_code == status


# --- every format through both APIs --------------------------------------------------------------------

@pytest.mark.parametrize("t", [t for t in TRANSCRIPTS if t.calls and t.streamed_call is not None],
                         ids=lambda t: t.format)
def test_each_format_streams_through_both_apis(t):
    tokenizer = family_tokenizer(t.format)
    with serve_in_thread(tokenizer, tool_parser=t.format) as served:
        served.fake.reply = t.text
        assert type(served.server.config.app.state.tokenspeed.tool_format) is FORMATS[t.format]
        tools = [{"type": "function", "function": {"name": s.name, "parameters": s.parameters}} for s in t.tools]
        oai = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="x", max_retries=0)
        chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                                  tools=tools, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        names = [d.function.name for d in deltas if d.function.name]
        args = ["".join(d.function.arguments or "" for d in deltas if d.index == i) for i in range(len(names))]
        assert content == t.content and names == [n for n, _ in t.calls]
        assert [json.loads(a) for a in args] == [a for _, a in t.calls]
        assert len([d for d in deltas if d.index == 0]) > 3
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        claude = anthropic.Anthropic(base_url=served.base_url, api_key="x", max_retries=0)
        with claude.messages.stream(model=MODEL, max_tokens=1000, messages=[{"role": "user", "content": "go"}],
                                    tools=[{"name": s.name, "input_schema": s.parameters} for s in t.tools]) as s:
            events = list(s)
            final = s.get_final_message()
        uses = [b for b in final.content if b.type == "tool_use"]
        assert [(b.name, b.input) for b in uses] == t.calls
        assert "".join(b.text for b in final.content if b.type == "text") == t.content
        assert len([e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]) > 3
        thinking = "".join(b.thinking for b in final.content if b.type == "thinking")
        assert thinking == t.reasoning and final.stop_reason == "tool_use"


PLACEHOLDER = "[image omitted: this model reads text only]"
PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}


def test_images_and_documents_become_placeholders_so_an_agent_session_goes_on(
        claude, oai, served, tokenizer):
    """A screenshot the user pasted, an image or PDF a tool returned, a plain-text document and a
    server tool's blocks from a conversation begun on Anthropic's API: the turn is served, each
    image and PDF a placeholder, the text document's text kept, the server tool's blocks left
    out. Refused, every later turn of the session (agents resend it all) was refused too."""
    claude.messages.create(model=MODEL, max_tokens=8, tools=ANTHROPIC_TOOLS, messages=[
        {"role": "user", "content": [{"type": "text", "text": "what is in"},
                                     {"type": "image", "source": PNG}]},
        {"role": "assistant", "content": [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
            {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "a.png"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                {"type": "image", "source": PNG},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                "data": "NOTES-42"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                "data": "JVBERi0="}}]}]}])
    prompt = tokenizer.decode(served.fake.requests[-1].prompt_ids)
    assert prompt.count(PLACEHOLDER) == 2 and "NOTES-42" in prompt
    assert "[document omitted: this model reads text only]" in prompt
    assert "srvtoolu_1" not in prompt
    oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,x"}}]}])
    assert PLACEHOLDER in tokenizer.decode(served.fake.requests[-1].prompt_ids)


def test_codex_hosted_and_custom_tools_are_left_out_and_their_calls_kept(served, tokenizer):
    """`codex --search` adds a web_search tool, some models get local_shell or a free-form
    apply_patch: the function tools are served, the others left out (not a 400 every turn); the
    history's custom and local_shell calls are calls the template shows, a web search call is
    left out, an image a placeholder."""
    shell = {"type": "function", "name": "shell", "parameters": {
        "type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}}}}
    body = {"model": MODEL, "stream": False, "tools": [
        shell, {"type": "web_search"}, {"type": "local_shell"},
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark",
                                                             "definition": "start: /.+/"}}],
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "fix it"},
                                         {"type": "input_image", "image_url": "data:image/png;base64,x"}]},
            {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"query": "q"}},
            {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** PATCH-7"},
            {"type": "custom_tool_call_output", "call_id": "c1", "output": "PATCHED-OK"},
            {"type": "local_shell_call", "call_id": "c2", "status": "completed",
             "action": {"type": "exec", "command": ["ls", "LSDIR-9"]}},
            {"type": "function_call_output", "call_id": "c2", "output": "LISTED-OK"}]}
    with served.http() as http:
        r = http.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    prompt = tokenizer.decode(served.fake.requests[-1].prompt_ids)
    for text in ("PATCH-7", "PATCHED-OK", "LSDIR-9", "LISTED-OK", '"shell"', PLACEHOLDER):
        assert text in prompt, text
    assert '"web_search"' not in prompt and "ws_1" not in prompt
