"""`/v1/messages` and `/v1/messages/count_tokens` through the real `anthropic` SDK."""

from __future__ import annotations

import anthropic
import pytest

from .conftest import MODEL, wait_until

TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CALL_REPLY = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture()
def client(served) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.base_url, api_key="unused", max_retries=0)


def test_messages_non_stream(client, served, tokenizer):
    served.fake.reply = "Bonjour ! Ça va ?"
    message = client.messages.create(
        model=MODEL, max_tokens=64, extra_body={"temperature": 0.5, "top_k": 20},
        system=[{"type": "text", "text": "You are terse."}],
        metadata={"user_id": "bob"},
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}]}])
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Bonjour ! Ça va ?"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    req = served.fake.requests[-1]
    assert message.usage.input_tokens == len(req.prompt_ids)
    assert message.usage.output_tokens == len(tokenizer.encode("Bonjour ! Ça va ?", add_special_tokens=False)) + 1
    assert (req.max_new_tokens, req.temperature, req.top_k, req.user) == (64, 0.5, 20, "bob")
    assert tokenizer.decode(req.prompt_ids).startswith("<|im_start|>system\nYou are terse.<|im_end|>")


def test_messages_stream_events(client, served):
    served.fake.reply = "streamed text"
    with client.messages.stream(model=MODEL, max_tokens=32,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert kinds[-2:] == ["message_delta", "message_stop"] or kinds[-1] == "message_stop"
    assert final.content[0].text == "streamed text"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens >= 2
    assert final.usage.input_tokens == len(served.fake.requests[-1].prompt_ids)


def test_messages_raw_sse_order(served):
    served.fake.reply = "ok"
    body = {"model": MODEL, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with served.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        names = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
    names = [n for i, n in enumerate(names) if n != "content_block_delta" or names[i - 1] != n]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]


def test_max_tokens_and_stop_sequence(client, served):
    served.fake.reply = "one two three four five six"
    message = client.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 2
    message = client.messages.create(model=MODEL, max_tokens=50, stop_sequences=["e fo"],
                                     messages=[{"role": "user", "content": "x"}])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "e fo"
    assert message.content[0].text == "one two thre"


def test_tool_use_non_stream_and_stream(client, served):
    served.fake.reply = CALL_REPLY
    message = client.messages.create(model=MODEL, max_tokens=100, tools=TOOLS,
                                     messages=[{"role": "user", "content": "weather in Paris?"}])
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Checking."
    tool = message.content[1]
    assert tool.id.startswith("toolu_") and tool.name == "get_weather" and tool.input == {"city": "Paris"}
    with client.messages.stream(model=MODEL, max_tokens=100, tools=TOOLS,
                                messages=[{"role": "user", "content": "weather?"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Checking." and final.content[1].input == {"city": "Paris"}


def test_a_call_cut_off_by_max_tokens_is_a_tool_use_block_streamed_or_not(client, served, tokenizer):
    """max_tokens ends the output inside the arguments: both modes give the call's tool_use
    block (input {}) and stop_reason max_tokens, as Anthropic's API does."""
    served.fake.reply = CALL_REPLY
    cut = len(tokenizer.encode(CALL_REPLY[:CALL_REPLY.index("Paris") + 2], add_special_tokens=False))
    body = dict(model=MODEL, max_tokens=cut, tools=TOOLS, messages=[{"role": "user", "content": "weather?"}])
    message = client.messages.create(**body)
    with client.messages.stream(**body) as stream:
        streamed = stream.get_final_message()
    for final in (message, streamed):
        assert final.stop_reason == "max_tokens"
        assert [b.type for b in final.content] == ["text", "tool_use"]
        assert final.content[0].text == "Checking." and final.content[1].name == "get_weather"
    assert message.content[1].input == {}


def test_tool_choice_tool_offers_only_that_tool_and_bad_choices_are_400(client, served, tokenizer):
    served.fake.reply = CALL_REPLY
    other = {"name": "list_dir", "input_schema": {"type": "object", "properties": {}}}
    message = client.messages.create(model=MODEL, max_tokens=100, tools=[other] + TOOLS,
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     messages=[{"role": "user", "content": "weather?"}])
    assert message.content[1].name == "get_weather"
    prompt = tokenizer.decode(served.fake.requests[-1].prompt_ids)
    assert '"get_weather"' in prompt and '"list_dir"' not in prompt
    n = len(served.fake.requests)
    for extra, text in (({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
                         "'nope', which is not in tools"),
                        ({"tool_choice": {"type": "any"}}, "'any' needs at least one tool")):
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(model=MODEL, max_tokens=10,
                                   messages=[{"role": "user", "content": "x"}], **extra)
        assert e.value.body["type"] == "error" and text in e.value.body["error"]["message"]
    assert len(served.fake.requests) == n


def test_a_tool_whose_input_schema_is_no_object_is_a_400(client, served):
    n = len(served.fake.requests)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=10, tool_choice={"type": "any"},
                               tools=[{"name": "f", "input_schema": {"type": "string"}}],
                               messages=[{"role": "user", "content": "x"}])
    assert 'must be a JSON schema of "type": "object"' in e.value.body["error"]["message"]
    assert len(served.fake.requests) == n


def test_tool_result_round_trip_renders_template(client, served, tokenizer):
    served.fake.reply = "It is sunny."
    message = client.messages.create(model=MODEL, max_tokens=20, tools=TOOLS, messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny, 21C"}]},
            {"type": "text", "text": "and tomorrow?"}]}])
    assert message.content[0].text == "It is sunny."
    prompt = tokenizer.decode(served.fake.requests[-1].prompt_ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21C\n</tool_response>" in prompt
    assert prompt.index("</tool_response>") < prompt.index("and tomorrow?")
    assert "hmm" not in prompt


def test_count_tokens_matches_prompt(client, served):
    messages = [{"role": "user", "content": "count me please"}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages, system="sys", tools=TOOLS)
    client.messages.create(model=MODEL, max_tokens=4, messages=messages, system="sys", tools=TOOLS)
    assert counted.input_tokens == len(served.fake.requests[-1].prompt_ids) > 10


def test_session_from_metadata(client, served):
    client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}],
                           metadata={"user_id": "u1"}, extra_body={"metadata": {"user_id": "u1", "session_id": "s-9"}})
    assert served.fake.requests[-1].session == "s-9"
    claude_code_user = "user_8f3a_account_42b1_session_0d9c6e2a-1b2c-4d5e-8f90-123456789abc"
    client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}],
                           metadata={"user_id": claude_code_user})
    assert served.fake.requests[-1].session == "0d9c6e2a-1b2c-4d5e-8f90-123456789abc"
    assert served.fake.requests[-1].user == "user_8f3a"  # one user across their sessions
    client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}],
                           metadata={"user_id": claude_code_user}, extra_headers={"x-session-id": "hdr"})
    assert served.fake.requests[-1].session == "hdr"
    as_json = '{"device_id": "dev-1", "account_uuid": "", "session_id": "sess-7"}'  # newer Claude Code
    client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}],
                           metadata={"user_id": as_json})
    assert (served.fake.requests[-1].session, served.fake.requests[-1].user) == ("sess-7", "dev-1")


def test_stream_disconnect_aborts_request(served):
    served.fake.reply = "word " * 200
    served.fake.delay_s = 0.02
    body = {"model": MODEL, "max_tokens": 500, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with served.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
        for line in response.iter_lines():
            if "content_block_delta" in line:
                break
    rid = served.fake.requests[-1].rid
    assert wait_until(lambda: rid in served.fake.aborted)
    assert wait_until(lambda: rid not in served.fake.running)


def test_models_list_through_anthropic_sdk(client):
    (model,) = list(client.models.list())
    assert model.id == MODEL and model.type == "model"


def test_assistant_prefill_is_continued(client, served, tokenizer):
    served.fake.reply = " 42."
    message = client.messages.create(model=MODEL, max_tokens=10, messages=[
        {"role": "user", "content": "What is six times seven?"},
        {"role": "assistant", "content": "The answer is"}])
    assert message.content[0].text == " 42."
    prompt = tokenizer.decode(served.fake.requests[-1].prompt_ids)
    assert prompt.endswith("<|im_start|>assistant\nThe answer is")


def test_server_tools_are_left_out_of_the_offered_tools(client, served, tokenizer):
    """Anthropic runs `web_search_20250305` & co. on its servers; no client answers a call of
    one, so the model is not offered them (a client tool of the same request still is)."""
    served.fake.reply = "No search here."
    client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "news?"}],
                           tools=[*TOOLS, {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}])
    prompt = tokenizer.decode(served.fake.requests[-1].prompt_ids)
    assert '"get_weather"' in prompt and '"web_search"' not in prompt
    with pytest.raises(anthropic.BadRequestError):  # nothing left to force a call of
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}],
                               tools=[{"type": "web_search_20250305", "name": "web_search"}],
                               tool_choice={"type": "any"})


def test_text_after_a_call_comes_after_it_whole_as_streamed(client, served):
    """A non-streamed reply put text the model wrote after its call (a forced call's cut-off
    second header, say) before the tool_use block; the stream had it after."""
    served.fake.reply = CALL_REPLY + "\nAnd then some."
    kwargs = dict(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "weather?"}], tools=TOOLS)
    whole = client.messages.create(**kwargs).content
    with client.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message().content
    order = [(b.type, b.text if b.type == "text" else b.input) for b in whole]
    assert order == [("text", "Checking."), ("tool_use", {"city": "Paris"}), ("text", "And then some.")]
    assert [(b.type, b.text if b.type == "text" else b.input) for b in streamed] == order


def test_a_forced_calls_cut_off_second_header_is_no_text_block(client, served, tokenizer):
    """tool_choice any allows calls only: a second call's header cut by max_tokens is markup
    (QA round 5: it came back as a text block after the tool_use)."""
    reply = CALL_REPLY.removeprefix("Checking.\n") + '\n<tool_call>\n{"name": "get_'
    served.fake.reply = reply
    body = dict(model=MODEL, max_tokens=len(tokenizer.encode(reply, add_special_tokens=False)), tools=TOOLS,
                tool_choice={"type": "any"}, messages=[{"role": "user", "content": "weather?"}])
    message = client.messages.create(**body)
    with client.messages.stream(**body) as stream:
        streamed = stream.get_final_message()
    for final in (message, streamed):
        assert final.stop_reason == "max_tokens"
        assert [(b.type, b.input) for b in final.content] == [("tool_use", {"city": "Paris"})]
