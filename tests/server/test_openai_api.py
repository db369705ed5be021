"""The OpenAI endpoints through the real `openai` SDK, against the app served by uvicorn."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import MODEL, wait_until

TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]
CALL_REPLY = ('I will read it.\n<tool_call>\n{"name": "read_file", "arguments": {"path": "src/main.py"}}'
              '\n</tool_call>')


@pytest.fixture()
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


def test_chat_non_stream(client, served, tokenizer):
    served.fake.reply = "Hi there, naïve café ☕!"
    out = client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]}],
        max_tokens=50, temperature=0.3, top_p=0.9, seed=7, user="alice")
    assert out.choices[0].message.content == "Hi there, naïve café ☕!"
    assert out.choices[0].finish_reason == "stop"
    assert out.object == "chat.completion" and out.model == MODEL
    req = served.fake.requests[-1]
    prompt = tokenizer.decode(req.prompt_ids)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay\nhi")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert (req.max_new_tokens, req.temperature, req.top_p, req.seed, req.user) == (50, 0.3, 0.9, 7, "alice")
    assert not req.ignore_eos  # the engine stops at the model's end-of-sequence ids
    n_reply = len(tokenizer.encode(served.fake.reply, add_special_tokens=False)) + 1
    assert out.usage.prompt_tokens == len(req.prompt_ids)
    assert out.usage.completion_tokens == n_reply
    assert out.usage.total_tokens == len(req.prompt_ids) + n_reply


def test_chat_stream_with_usage(client, served):
    served.fake.reply = "Streaming 日本語 works."
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                            max_completion_tokens=64, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Streaming 日本語 works."
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 3
    assert served.fake.requests[-1].max_new_tokens == 64


def test_chat_length_finish(client, served):
    served.fake.reply = "one two three four five six seven eight nine ten"
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count"}],
                                         max_tokens=3)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 3


def test_default_max_tokens_is_rest_of_context_capped(client, served):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    req = served.fake.requests[-1]
    assert req.max_new_tokens == min(4096 - len(req.prompt_ids), 8192)


def test_stop_string_split_across_tokens(client, served, tokenizer):
    served.fake.reply = "alpha beta gamma delta"
    stop = "a gam"  # spans the tokens of "beta" and "gamma"
    ids = tokenizer.encode(served.fake.reply, add_special_tokens=False)
    assert not any(stop in tokenizer.decode([i]) for i in ids)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stop=[stop])
    assert out.choices[0].message.content == "alpha bet"
    assert out.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                            stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "alpha bet"
    rids = [req.rid for req in served.fake.requests]
    assert len(rids) == 2
    assert wait_until(lambda: set(rids) <= served.fake.aborted)  # the engine was told to stop early
    assert sorted(served.fake.abort_messages) == rids  # once each: closing the stream is the abort


def test_tool_call_non_stream(client, served, tokenizer):
    served.fake.reply = CALL_REPLY
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "read main"}],
                                         tools=TOOLS, tool_choice="auto")
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls"
    assert message.content == "I will read it."
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "read_file"
    assert json.loads(call.function.arguments) == {"path": "src/main.py"}
    prompt = tokenizer.decode(served.fake.requests[-1].prompt_ids)
    assert "<tools>" in prompt and '"read_file"' in prompt


def test_tool_call_stream_leaks_no_markup(client, served):
    served.fake.reply = CALL_REPLY
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "read"}],
                                            tools=TOOLS, stream=True)
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "I will read it."
    assert "<" not in content and "tool_call" not in content
    first, *more = deltas
    assert first.index == 0 and first.id.startswith("call_") and first.function.name == "read_file"
    assert len(more) > 1 and all(d.index == 0 and d.id is None and d.function.name is None for d in more)
    arguments = "".join(d.function.arguments for d in deltas)  # streamed as they were generated
    assert json.loads(arguments) == {"path": "src/main.py"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_passes_markup_through_as_text(client, served, tokenizer):
    served.fake.reply = CALL_REPLY
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                         tools=TOOLS, tool_choice="none")
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason == "stop"
    assert "<tools>" not in tokenizer.decode(served.fake.requests[-1].prompt_ids)


def test_named_tool_choice_offers_only_that_tool(client, served, tokenizer):
    served.fake.reply = CALL_REPLY
    other = {"type": "function", "function": {"name": "list_dir", "parameters": {"type": "object"}}}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[other] + TOOLS,
        tool_choice={"type": "function", "function": {"name": "read_file"}})
    assert out.choices[0].message.tool_calls[0].function.name == "read_file"
    prompt = tokenizer.decode(served.fake.requests[-1].prompt_ids)
    assert '"read_file"' in prompt and '"list_dir"' not in prompt


CUT_SECOND_CALL = ('<tool_call>\n{"name": "read_file", "arguments": {"path": "a.py"}}\n</tool_call>\n'
                   '<tool_call>\n{"name": "read')


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "read_file"}}])
def test_forced_calls_cut_by_max_tokens_give_no_markup_as_text(client, served, tokenizer, choice):
    """A forced choice's grammar allows calls only, so a second call's header cut by max_tokens
    is markup, not an answer (QA round 5: it came back as content); under `auto` it stays text."""
    served.fake.reply = CUT_SECOND_CALL
    cut = len(tokenizer.encode(CUT_SECOND_CALL, add_special_tokens=False))
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=TOOLS, max_tokens=cut)
    out = client.chat.completions.create(**ask, tool_choice=choice)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "length"
    assert message.content is None and [c.function.name for c in message.tool_calls] == ["read_file"]
    chunks = list(client.chat.completions.create(**ask, tool_choice=choice, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    auto = client.chat.completions.create(**ask, tool_choice="auto").choices[0].message
    assert auto.content == '<tool_call>\n{"name": "read' and len(auto.tool_calls) == 1


@pytest.mark.parametrize("tools,choice,message", [
    (TOOLS, {"type": "function", "function": {"name": "write_file"}}, "'write_file', which is not in tools"),
    (None, {"type": "function", "function": {"name": "read_file"}}, "'read_file', which is not in tools"),
    (None, "required", "'required' needs at least one tool")])
def test_unsatisfiable_tool_choice_is_a_400(client, served, tools, choice, message):
    n = len(served.fake.requests)
    extra = {"tools": tools} if tools else {}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       tool_choice=choice, **extra)
    assert message in e.value.body["message"] and e.value.body["param"] == "tool_choice"
    assert len(served.fake.requests) == n      # nothing reached the engine


@pytest.mark.parametrize("schema", [{"type": "string"}, {"type": "array"}, {"type": ["object", "null"]}])
def test_a_tool_whose_parameters_are_no_object_is_a_400(client, served, schema):
    """A call's arguments are one JSON object (OpenAI refuses other schemas too); accepted, a
    forced call came back as raw markup in the text."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    n = len(served.fake.requests)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       tools=tools, tool_choice="required")
    assert 'must be a JSON schema of "type": "object"' in e.value.body["message"]
    assert e.value.body["param"] == "tools.0.function.parameters"
    assert len(served.fake.requests) == n      # nothing reached the engine


@pytest.mark.parametrize("legacy, param", [
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call")])
def test_deprecated_functions_fields_are_a_400_naming_their_successor(client, served, legacy, param):
    """Ignored, a forced function_call would never come and the client would wait for it."""
    n = len(served.fake.requests)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       extra_body=legacy)
    assert e.value.body["param"] == param and "deprecated" in e.value.body["message"]
    assert len(served.fake.requests) == n


def test_multi_turn_with_tool_results_renders_template(client, served, tokenizer):
    served.fake.reply = "The file defines main()."
    out = client.chat.completions.create(model=MODEL, tools=TOOLS, messages=[
        {"role": "user", "content": "read main"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "read_file", "arguments": '{"path": "src/main.py"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "def main(): pass"}])
    assert out.choices[0].message.content == "The file defines main()."
    prompt = tokenizer.decode(served.fake.requests[-1].prompt_ids)
    assert '<tool_call>\n{"name": "read_file", "arguments": {"path": "src/main.py"}}\n</tool_call>' in prompt
    assert "<tool_response>\ndef main(): pass\n</tool_response>" in prompt


def test_completions_string_and_token_prompt(client, served, tokenizer):
    served.fake.reply = " jumps over the lazy dog"
    out = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=40)
    assert out.choices[0].text == " jumps over the lazy dog"
    assert out.object == "text_completion" and out.choices[0].finish_reason == "stop"
    assert served.fake.requests[-1].prompt_ids == tokenizer.encode("The quick brown fox")
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2)
    assert served.fake.requests[-1].prompt_ids == [5, 6, 7]
    assert out.choices[0].finish_reason == "length" and out.usage.prompt_tokens == 3


def test_completions_default_max_tokens_is_16(client, served):
    client.completions.create(model=MODEL, prompt="hello")
    assert served.fake.requests[-1].max_new_tokens == 16


def test_completions_stream(client, served):
    served.fake.reply = "a b c"
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "a b c"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 4


def test_ignore_eos_and_session_hint(client, served):
    client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"ignore_eos": True},
                              extra_headers={"x-session-id": "agent-42"})
    req = served.fake.requests[-1]
    assert req.ignore_eos and req.stop_token_ids == [] and req.session == "agent-42"
    assert req.max_new_tokens == 5
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                   extra_body={"session_id": "from-body"})
    assert served.fake.requests[-1].session == "from-body"


def _slow(served) -> None:
    served.fake.reply = "word " * 300
    served.fake.delay_s = 0.02


def test_disconnect_during_stream_aborts(served):
    _slow(served)
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "stream": True}
    with served.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    rid = served.fake.requests[-1].rid
    assert wait_until(lambda: rid in served.fake.aborted and rid not in served.fake.running)


def test_disconnect_during_non_stream_aborts(served):
    _slow(served)
    with pytest.raises(httpx.ReadTimeout), served.http() as http:
        http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 300},
                  timeout=0.5)
    rid = served.fake.requests[-1].rid
    assert wait_until(lambda: rid in served.fake.aborted and rid not in served.fake.running)
    assert len(served.fake.requests) == 1


def test_completions_return_token_ids(served, tokenizer):
    served.fake.reply = "ids please"
    expected = tokenizer.encode("ids please", add_special_tokens=False) + [2]
    with served.http() as http:
        body = {"prompt": "x", "max_tokens": 20, "return_token_ids": True}
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
        assert choice["token_ids"] == expected and choice["text"] == "ids please"
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = [c["choices"][0]["token_ids"] for c in chunks
                    if c["choices"] and "token_ids" in c["choices"][0]]
        assert streamed == [[t] for t in expected]  # one chunk per token (each arrived apart)
        # ... which carries the token's text: no chunk of text alone, then the finish chunk
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert "".join(texts) == "ids please" and len(texts) == len(expected) + 1
        assert "token_ids" not in http.post("/v1/completions", json={"prompt": "x"}).json()["choices"][0]
