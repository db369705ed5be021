"""`POST /v1/responses` through the real `openai` SDK against the app (fake engine): text and
tool calls, streamed (the SDK's event accumulator checks the event order) and not, a Codex-style
loop with a function call and its output, usage with cached tokens, and what is refused."""

from __future__ import annotations

import json

import llguidance
import openai
import pytest

from .conftest import MODEL

SHELL = {"type": "function", "name": "shell", "description": "Run a shell command",
         "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}},
                                                         "workdir": {"type": "string"}},
                        "required": ["command"]}, "strict": False}
CALL = ('Listing the files.\n<tool_call>\n{"name": "shell", "arguments": {"command": ["ls", "-la"], '
        '"workdir": "/repo"}}\n</tool_call>')


@pytest.fixture()
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)


def test_text_response_not_streamed(client, served):
    served.fake.reply = "Hello, naïve café ☕!"
    generated = served.fake.totals["generation_tokens_total"]
    out = client.responses.create(model=MODEL, input="hi", instructions="Be brief.", max_output_tokens=50,
                                  temperature=0.2, top_p=0.9)
    assert out.status == "completed" and out.output_text == "Hello, naïve café ☕!"
    assert out.id.startswith("resp_") and out.model == MODEL and out.store is False
    assert [item.type for item in out.output] == ["message"]
    usage = out.usage
    assert usage.input_tokens == len(served.fake.requests[-1].prompt_ids)
    assert usage.output_tokens == served.fake.totals["generation_tokens_total"] - generated
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    req = served.fake.requests[-1]
    assert (req.temperature, req.top_p, req.max_new_tokens) == (0.2, 0.9, 50)


def test_streamed_text_follows_the_event_sequence(client, served):
    served.fake.reply = "One two three four."
    with client.responses.stream(model=MODEL, input=[{"role": "user", "content": "count"}]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert kinds.count("response.output_text.delta") > 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "One two three four."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "One two three four."


def test_codex_style_loop_with_a_function_call_and_its_output(client, served, tokenizer):
    """Turn 1 streams a call (arguments in several deltas); turn 2 sends the call and its
    output back as input items, with no server-side state, and gets the answer; turn 2's
    prompt starts with turn 1's, so its usage shows cached tokens."""
    served.fake.scripts[:] = [CALL, "There are two files."]
    history: list = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]}]
    kwargs = dict(model=MODEL, instructions="You are Codex.", tools=[SHELL], tool_choice="auto",
                  parallel_tool_calls=False, store=False, include=["reasoning.encrypted_content"],
                  prompt_cache_key="conv-1")
    with client.responses.stream(input=history, **kwargs) as stream:
        events = list(stream)
        first = stream.get_final_response()
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "shell"
    assert json.loads(calls[0].arguments) == {"command": ["ls", "-la"], "workdir": "/repo"}
    assert first.output_text == "Listing the files."
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and "".join(deltas) == calls[0].arguments
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == calls[0].arguments
    request = served.fake.requests[-1]
    assert request.session == "conv-1"
    assert request.constraint is not None and request.constraint.kind == "lark"  # one call at most

    history += [item.model_dump(exclude_none=True) for item in first.output]
    history.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "a.py\nb.py"})
    hits = served.fake.totals["prefix_cache_hit_tokens_total"]
    second = client.responses.create(input=history, **kwargs)
    assert second.output_text == "There are two files."
    prompt = tokenizer.decode(served.fake.requests[-1].prompt_ids)
    assert "a.py\nb.py" in prompt and '"command": ["ls", "-la"]' in prompt and "You are Codex." in prompt
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert second.usage.input_tokens_details.cached_tokens == served.fake.totals["prefix_cache_hit_tokens_total"] - hits


def test_reasoning_items_reach_the_template(client, served, tokenizer):
    out = client.responses.create(model=MODEL, input=[
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking it over"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"role": "user", "content": "again"}])
    assert out.status == "completed"
    assert "Hello." in tokenizer.decode(served.fake.requests[-1].prompt_ids)


def test_forced_choices_and_formats_become_constraints(client, served):
    served.fake.reply = CALL
    client.responses.create(model=MODEL, input="x", tools=[SHELL], tool_choice="required")
    constraint = served.fake.requests[-1].constraint
    assert constraint.kind == "lark"
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(constraint.spec)) == ""
    client.responses.create(model=MODEL, input="x", tools=[SHELL], tool_choice={"type": "function", "name": "shell"})
    assert '"shell"' in served.fake.requests[-1].constraint.spec
    served.fake.reply = '{"a": 1}'
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client.responses.create(model=MODEL, input="x", text={"format": {"type": "json_schema", "name": "s",
                                                                     "schema": schema}})
    constraint = served.fake.requests[-1].constraint
    assert constraint.kind == "json_schema" and json.loads(constraint.spec) == schema
    client.responses.create(model=MODEL, input="x")
    assert served.fake.requests[-1].constraint is None


def test_cut_off_response_is_incomplete(client, served):
    served.fake.reply = "a long answer that goes on"
    out = client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.output[0].status == "incomplete"


def test_a_stream_that_fails_ends_with_error_and_response_failed(served):
    served.fake.reply, served.fake.fail_after = "one two three four five", 2
    served.fake.failure = RuntimeError("boom")
    with served.http() as http:
        with http.stream("POST", "/v1/responses", json={"model": MODEL, "input": "x", "stream": True}) as r:
            names = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert names[-2:] == ["error", "response.failed"]
    assert "response.completed" not in names


@pytest.mark.parametrize("body, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
    ({"tools": [{**SHELL, "parameters": {"type": "string"}}]}, "tools.0.parameters"),
    ({"input": [{"type": "function_call", "call_id": 5, "name": "f", "arguments": "{}"}]},
     "input.0.call_id"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [SHELL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "wat"}}}}, "text.format"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 5000}, "max_output_tokens"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"background": True}, "background"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_video"}]}]}, "input.0.content.0"),
    ({"input": []}, "input"),
    ({"input": "x" * 40_000}, "input"),
])
def test_refused_with_a_400_naming_the_field(served, body, param):
    with served.http() as http:
        r = http.post("/v1/responses", json={"model": MODEL, "input": "x", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not served.fake.requests


def test_text_after_a_call_is_a_message_after_it_whole_as_streamed(client, served):
    served.fake.reply = CALL + "\nAnd then some."
    kwargs = dict(model=MODEL, input="list", tools=[SHELL])
    whole = client.responses.create(**kwargs).output
    streamed = [e for e in client.responses.create(stream=True, **kwargs)][-1].response.output

    def kinds(items):
        return [(i.type, i.content[0].text if i.type == "message" else i.name) for i in items]

    assert kinds(whole) == [("message", "Listing the files."), ("function_call", "shell"),
                            ("message", "And then some.")]
    assert kinds(streamed) == kinds(whole)
