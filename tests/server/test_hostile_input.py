"""Hostile input against the in-process app (fake engine): every field of the five POST
endpoints with values out of range, of the wrong type, too big, and bodies that are not strict
JSON (invalid UTF-8, lone surrogates, NaN, nesting). Each is a 4xx in the API's own error shape,
nothing reaches the engine, and the next normal request is served."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.engine.protocol import MAX_REPETITION_PENALTY, MIN_TOP_P
from appliance.server.field_types import INT32_MAX, INT64_MAX, INT64_MIN

from .conftest import MODEL

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
MESSAGES, COUNT = "/v1/messages", "/v1/messages/count_tokens"
USER = [{"role": "user", "content": "hi"}]
BASE = {
    CHAT: {"model": MODEL, "messages": USER, "max_tokens": 4},
    COMPLETIONS: {"model": MODEL, "prompt": "hi", "max_tokens": 4},
    RESPONSES: {"model": MODEL, "input": "hi", "max_output_tokens": 4},
    MESSAGES: {"model": MODEL, "max_tokens": 4, "messages": USER},
    COUNT: {"model": MODEL, "messages": USER},
}
VOCAB = 1000  # the tiny tokenizer's

# The fields both OpenAI endpoints share, with values each must refuse.
OPENAI_SAMPLING: dict[str, list[Any]] = {
    "model": [5, True, ["x"]],
    "stream": ["yes", 1, "true"],
    "stream_options": ["x", {"include_usage": "yes"}],
    "max_tokens": [True, 0, -1, 1.5, "5", INT32_MAX + 1, 2**64, 10**40],
    "temperature": [-0.1, 2.5, "0.5", True, [1]],
    "top_p": [0, -1, 1.5, "1", True, 1e-50, 5e-324],  # the last two: below float32's normals
    "top_k": [-2, INT32_MAX + 1, 10**12, True, 1.5, "5"],
    "seed": [INT64_MAX + 1, INT64_MIN - 1, 2**64, True, 1.5, "1"],
    "stop": [5, [5], ["x"] * 17, "x" * 257, ["x" * 257], [None]],
    "n": [17, 0, True, "1"],
    "presence_penalty": ["x", True, 2.5],
    "frequency_penalty": ["x", False, -2.5],
    "logit_bias": ["x", [1], {"5": 101}, {"5": "x"}, {"5": True}, {str(VOCAB): 1}, {"-1": 1}, {"1e2": 1},
                   {" 5": 1}, {str(i): 1 for i in range(1025)}],
    "repetition_penalty": [0, -1, "x", True, 1e-30, 1e30],  # past the engine's [1e-6, 1e6]
    "min_tokens": [-1, True, "3", 5, INT32_MAX + 1],  # 5 > max_tokens
    "structured_outputs": ["x", {}, {"json": 5}, {"json": {"type": 12}}, {"json": "{bad"},
                           {"grammar": "start: nope"}, {"regex": "a+"}, {"choice": ["a"]},
                           {"json_object": True, "grammar": 'start: "a"'}, {"json_object": "yes"}],
    "user": [5, ["u"]],
    "session_id": [5, {"a": 1}],
    "ignore_eos": ["yes", 1],
    "return_token_ids": ["yes", 0],
    "speculative": ["no", 0, None],
}
CHAT_FIELDS: dict[str, list[Any]] = {
    **OPENAI_SAMPLING,
    "messages": [[], "hi", None, [{"role": "user", "content": 5}], [{"role": True, "content": "x"}],
                 [{"role": "user", "content": [{"type": 5}]}], [{"role": "user", "content": "x", "name": 5}],
                 [{"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}],
                 [{"role": "tool", "content": "x", "tool_call_id": 5}],
                 [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]],
    "max_completion_tokens": [True, 0, "5", INT32_MAX + 1, 5000],
    "tools": ["x", [{"type": "function", "function": {"name": ""}}], [{"function": {"name": 5}}]],
    "tool_choice": ["maybe", 5, {"type": "function", "function": {"name": "nope"}}, "required"],  # no tools
    "parallel_tool_calls": ["yes", 1],
    "logprobs": ["yes", 1],
    "top_logprobs": [True, 3, "3", 21, -1],  # 3: without logprobs true
    "response_format": ["json", {"type": "yaml"}, {"type": "json_schema"},
                        {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}},
                        {"type": "json_schema", "json_schema": "x"},
                        {"type": "json_schema", "json_schema": 255}],
    "chat_template_kwargs": ["x", 5, [1]],
}
COMPLETION_FIELDS: dict[str, list[Any]] = {
    **OPENAI_SAMPLING,
    "prompt": [5, True, None, {"a": 1}, [], [2**64], [-1], [VOCAB], [INT32_MAX + 1], [True], [1.5],
               [[1], [2]], ["a", "b"], [[VOCAB]]],
    "echo": ["yes", True],
    "logprobs": [True, "2", 21, -1],
    "best_of": [2, True],
    "suffix": [5, "x"],
}
RESPONSES_FIELDS: dict[str, list[Any]] = {
    "model": [5, True, "gpt-9"],
    "input": [5, None, [5], [{"type": "message", "role": "robot", "content": "x"}],
              [{"type": "function_call", "call_id": 5, "name": "f"}], [{"type": "item_reference", "id": "x"}],
              [{"role": "user", "content": [{"type": "input_video", "video_url": "x"}]}],
              [{"type": []}], [{"type": {"type": "message"}}]],
    "instructions": [5, ["x"]],
    "tools": ["x", [{"type": "function", "name": ""}], [{"type": 5}], [{"type": "function"}],
              [{"type": {}}], [{"type": []}]],
    "tool_choice": ["maybe", "required", {"type": "function", "name": "nope"}],
    "parallel_tool_calls": ["yes", 1],
    "max_output_tokens": [True, 0, "5", INT32_MAX + 1, 5000],
    "temperature": [-0.1, 2.5, "0.5"],
    "top_p": [0, 1.5, True],
    "stream": ["yes", 1],
    "text": ["x", {"format": {"type": "yaml"}}, {"format": {"type": "json_schema", "name": "x"}}],
    "previous_response_id": ["resp_1", 5],
    "top_logprobs": [3, "3"],
    "background": [True, "yes"],
}
ANTHROPIC_PROMPT: dict[str, list[Any]] = {
    "model": [5, None, True, "claude-x"],
    "messages": [[], "hi", None, [{"role": "system", "content": "x"}],
                 [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                 [{"role": "user", "content": [{"type": 5}]}],
                 [{"role": "user", "content": [{"type": []}]}], [{"role": "user", "content": [{"type": {}}]}],
                 [{"role": "user", "content": [{"type": "image", "source": 5}]}],
                 [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": 5}]}],
                 [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": "x"}]}]],
    "system": [5, [{"type": "text", "text": 5}], [{"type": "image"}]],
    "tools": ["x", [{"name": ""}], [{"name": "a", "input_schema": "x"}], [{"name": 5}]],
    "tool_choice": [{"type": "bogus"}, "auto", {"type": "tool"}, {"type": "tool", "name": "zz"},
                    {"type": "any"}, {"type": "auto", "disable_parallel_tool_use": "yes"}],
}
MESSAGES_FIELDS: dict[str, list[Any]] = {
    **ANTHROPIC_PROMPT,
    "max_tokens": [None, True, 0, -3, "4", 1.5, INT32_MAX + 1, 2**64, 5000],
    "stop_sequences": ["x", [5], ["x"] * 17, ["x" * 257]],
    "stream": ["yes", 1],
    "temperature": [1.5, -1, "0.5", True],
    "top_p": [0, 2, True, "0.5"],
    "top_k": [-1, INT32_MAX + 1, 10**12, True, "5"],
    "metadata": ["x", {"user_id": 5}, {"session_id": 5}],
    "speculative": ["no", 0, None],
}
FIELDS = {CHAT: CHAT_FIELDS, COMPLETIONS: COMPLETION_FIELDS, RESPONSES: RESPONSES_FIELDS,
          MESSAGES: MESSAGES_FIELDS, COUNT: ANTHROPIC_PROMPT}
CASES = [pytest.param(path, name, value, id=f"{path.rsplit('/', 1)[1]}-{name}-{i}")
         for path, fields in FIELDS.items() for name, values in fields.items()
         for i, value in enumerate(values)]

# Bodies that are not strict JSON objects in UTF-8, for every endpoint.
RAW_BODIES = {
    "truncated": b'{"model": "tiny-llama", "messages": [',
    "lone-surrogate-escape": b'{"model": "tiny-llama", "prompt": "\\ud800", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "low-surrogate-escape": b'{"model": "tiny-llama", "prompt": "a\\udc00", "messages": [{"role": "user", "content": "a\\udc00"}]}',
    "encoded-surrogate": b'{"model": "tiny-llama", "prompt": "\xed\xa0\x80", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    "invalid-utf8": b'{"model": "tiny-llama", "prompt": "\xff\xfe", "messages": [{"role": "user", "content": "\xc3"}]}',
    "nan": b'{"model": "tiny-llama", "prompt": "x", "messages": [], "temperature": NaN}',
    "infinity": b'{"model": "tiny-llama", "prompt": "x", "messages": [], "temperature": Infinity}',
    "huge-exponent": b'{"model": "tiny-llama", "prompt": "x", "messages": [], "temperature": 1e400}',
    "deep-nesting": b'{"model": "tiny-llama", "chat_template_kwargs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "array": b"[]",
    "null": b"null",
    "string": b'"hi"',
    "empty": b"",
    "utf16": '{"model": "tiny-llama"}'.encode("utf-16"),
}


# Issue 16 item 1: each of these was a 200-then-abort that killed the engine, a 500, or accepted.
ISSUE_16_CASES = [
    (CHAT, {**BASE[CHAT], "top_k": 1000000000000}, "top_k"),
    (MESSAGES, {**BASE[MESSAGES], "top_k": 1000000000000}, None),
    (CHAT, {**BASE[CHAT], "seed": 9223372036854775808}, "seed"),
    (CHAT, {**BASE[CHAT], "seed": 2**64}, "seed"),
    (COMPLETIONS, {**BASE[COMPLETIONS], "prompt": [2**64]}, "prompt.0"),
    (CHAT, {**BASE[CHAT], "max_tokens": True}, "max_tokens"),
    (CHAT, {**BASE[CHAT], "stream": "yes"}, "stream"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
]


def post_raw(http, path: str, body: dict[str, Any] | bytes):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers={"content-type": "application/json"})


def assert_api_error(path: str, response, status: int | None = None) -> None:
    """A 4xx in the OpenAI shape, or Anthropic's under /v1/messages; never a traceback."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    body = response.json()
    if path.startswith(MESSAGES):
        assert body["type"] == "error" and body["error"]["message"], body
        assert body["error"]["type"] in ("invalid_request_error", "not_found_error", "request_too_large",
                                         "rate_limit_error"), body
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"]
    assert "Traceback" not in response.text


def assert_still_serves(served, path: str = CHAT) -> None:
    with served.http() as http:
        response = http.post(path, json=BASE[path])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path,name,value", CASES)
def test_hostile_field_is_a_4xx_in_the_apis_shape(served, path, name, value):
    with served.http() as http:
        response = post_raw(http, path, {**BASE[path], name: value})
    assert_api_error(path, response)
    assert served.fake.requests == []  # refused at the edge, before the engine
    assert_still_serves(served, path)


@pytest.mark.parametrize("path", list(BASE))
@pytest.mark.parametrize("kind", list(RAW_BODIES))
def test_body_that_is_not_strict_json_is_400(served, path, kind):
    with served.http() as http:
        response = post_raw(http, path, RAW_BODIES[kind])
    assert_api_error(path, response, 400)
    assert served.fake.requests == []
    assert_still_serves(served, path)


def test_issue_16_requests_no_longer_reach_the_engine(served):
    with served.http() as http:
        for path, body, param in ISSUE_16_CASES:
            response = post_raw(http, path, body)
            assert_api_error(path, response, 400)
            if param is not None:
                assert response.json()["error"]["param"] == param
    assert served.fake.requests == []
    assert_still_serves(served, CHAT)
    assert_still_serves(served, MESSAGES)


def test_in_range_extremes_are_accepted_and_reach_the_engine_intact(served):
    body = {**BASE[CHAT], "top_k": INT32_MAX, "seed": INT64_MIN, "temperature": 2, "top_p": 1,
            "stop": ["x" * 256] * 16}
    with served.http() as http:
        assert http.post(CHAT, json=body).status_code == 200
        assert http.post(COMPLETIONS, json={**BASE[COMPLETIONS], "prompt": [0, VOCAB - 1], "seed": INT64_MAX,
                                            "top_k": -1}).status_code == 200
    chat, completion = served.fake.requests
    assert (chat.top_k, chat.seed, chat.temperature, chat.top_p) == (INT32_MAX, INT64_MIN, 2.0, 1.0)
    assert (completion.prompt_ids, completion.seed, completion.top_k) == ([0, VOCAB - 1], INT64_MAX, 0)


def test_template_kwargs_cannot_reach_apply_chat_templates_own_parameters(served):
    """`documents: 5` made apply_chat_template raise a TypeError (a 500); `messages` and
    `tokenize` would replace the conversation or the text: all are dropped."""
    with served.http() as http:
        assert http.post(CHAT, json=BASE[CHAT]).status_code == 200
        hostile = {"documents": 5, "tokenize": True, "messages": 5, "return_dict": True, "conversation": []}
        assert http.post(CHAT, json={**BASE[CHAT], "chat_template_kwargs": hostile}).status_code == 200
    plain, with_kwargs = served.fake.requests
    assert with_kwargs.prompt_ids == plain.prompt_ids


def test_json_inside_string_fields_is_read_as_strictly_as_a_body(served):
    """Claude Code's `metadata.user_id` and a tool call's `arguments` hold JSON text. A lone
    surrogate escape there (the body decoder refuses one in the body itself) reached the engine
    message's encoder (user_id: a 500, or an error event in a stream) or the tokenizer
    (arguments: a 500): such JSON is now left as the text it is."""
    lone = json.dumps({"session_id": "\ud800s", "account_uuid": "\udfffa"})   # \ud800 escapes
    args = json.dumps({"city": "\ud800"})
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    bodies = [
        (MESSAGES, {**BASE[MESSAGES], "metadata": {"user_id": lone}}),
        (MESSAGES, {**BASE[MESSAGES], "metadata": {"user_id": lone}, "stream": True}),
        (CHAT, {**BASE[CHAT], "tools": [tool], "messages": [
            *USER, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}),
        (RESPONSES, {**BASE[RESPONSES], "tools": [{"type": "function", "name": "f"}], "input": [
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": args},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]}),
    ]
    with served.http() as http:
        for path, body in bodies:
            response = post_raw(http, path, body)
            assert response.status_code == 200, (path, response.text[:300])
            assert "event: error" not in response.text, response.text[:300]
    assert len(served.fake.requests) == len(bodies)
    for req in served.fake.requests:   # as the engine channel sends it
        msgspec.msgpack.encode(req)


# --- fuzzing: any JSON value in any field -------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def _engine_can_take(req, max_model_len: int) -> bool:
    """What the real engine's `_submit` accepts (appliance/engine/engine.py, sampler.py)."""
    return (all(0 <= t < VOCAB for t in req.prompt_ids) and 1 <= req.max_new_tokens <= INT32_MAX
            and len(req.prompt_ids) + req.max_new_tokens <= max_model_len
            and math.isfinite(req.temperature) and req.temperature >= 0 and MIN_TOP_P <= req.top_p <= 1
            and 1 / MAX_REPETITION_PENALTY <= req.repetition_penalty <= MAX_REPETITION_PENALTY
            and 0 <= req.top_k <= INT32_MAX and (req.seed is None or INT64_MIN <= req.seed <= INT64_MAX))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(list(FIELDS)), data=st.data())
def test_any_value_in_any_field_is_never_a_5xx(served, path, data):
    served.fake.reset()
    name = data.draw(st.sampled_from(sorted(FIELDS[path])), label="field")
    value = data.draw(JSON_VALUES, label="value")
    with served.http() as http:
        response = post_raw(http, path, {**BASE[path], name: value})
    if response.status_code != 200:
        assert_api_error(path, response)
    for req in served.fake.requests:  # whatever got through is something the engine accepts
        assert _engine_can_take(req, 4096), req


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_under_another_content_type_is_read_as_json(served, content_type):
    """`curl -d '{...}'` declares form data: the body is still the JSON request it is (these
    routes take nothing else), not a 400 saying the object is not a dictionary."""
    headers = {"content-type": content_type} if content_type else {}
    with served.http() as http:
        r = http.post(CHAT, content=json.dumps(BASE[CHAT]).encode(), headers=headers)
        assert r.status_code == 200, r.text
        assert_api_error(CHAT, http.post(CHAT, content=b"a=1&b=2", headers=headers), 400)
