"""Constrained decoding and the sampling fields through the `openai` SDK against the app on the
real engine (tiny model, random weights, CPU): whatever the weights say, a JSON schema, any JSON
object or a Lark grammar holds; a grammar forcing a Hermes <tool_call> yields a parsed call;
constrained and free requests run side by side; bad grammars are 400s; logit_bias, min_tokens,
repetition_penalty and logprobs act on the real sampler."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from appliance.engine.client import EngineClient
from appliance.engine.model_files import resolve_model_files

from .conftest import MODEL, Served, serve_in_thread

pytestmark = pytest.mark.slow  # starts an engine rank process

USER = [{"role": "user", "content": "Give me the weather report."}]
EOS = 2  # <|im_end|>
SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 10},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7},
                         "units": {"enum": ["metric", "imperial"]},
                         "alerts": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
          "required": ["city", "days", "units", "alerts"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 5}},
                   "required": ["city", "days"], "additionalProperties": False}}}]
# A forced Hermes call: <tool_call> and </tool_call> are single added tokens of the tiny
# tokenizer, which llguidance names <...>; the arguments follow the tool's schema.
CALL_GRAMMAR = """
start: <tool_call> "\\n" call "\\n" </tool_call>
call: %json {"x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
             "type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": ARGS},
             "required": ["name", "arguments"], "additionalProperties": false}
""".replace("ARGS", json.dumps(TOOLS[0]["function"]["parameters"]))


@pytest.fixture(scope="module")
def live(tokenizer) -> Iterator[Served]:
    clients: list[EngineClient] = []

    def engine(config):
        clients.append(EngineClient(config, resolve_model_files(config), start_timeout_s=300))
        return clients[-1]

    with serve_in_thread(tokenizer, engine=engine) as served:
        try:
            yield served
        finally:
            for client in clients:
                client.close()


@pytest.fixture()
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def structured(client, spec: dict, **fields):
    return client.chat.completions.create(model=MODEL, messages=USER, max_tokens=300,
                                          extra_body={"structured_outputs": spec}, **fields)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_holds_on_random_weights(client, temperature):
    out = structured(client, {"json": SCHEMA}, temperature=temperature, seed=1)
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


def test_json_object_and_streamed_schema(client):
    out = structured(client, {"json_object": True}, temperature=0.0,
                     logit_bias={str(t): 4.0 for t in (4, 95)})  # '"' and '}': helps it close
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    chunks = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=300, stream=True,
                                            seed=5, extra_body={"structured_outputs": {"json": SCHEMA}})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_a_grammar_forcing_a_hermes_call_yields_a_parsed_call(client):
    out = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=200, seed=3,
                                         extra_body={"structured_outputs": {"grammar": CALL_GRAMMAR}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])


def test_constrained_and_free_requests_side_by_side(client):
    def free():
        return client.chat.completions.create(model=MODEL, messages=USER, max_tokens=60, seed=9,
                                              extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(structured, client, {"json": SCHEMA}, seed=s) for s in (11, 12)]
        frees = [pool.submit(free) for _ in range(2)]
        for job in jobs:
            jsonschema.validate(json.loads(job.result().choices[0].message.content), SCHEMA)
        for job in frees:
            assert job.result().usage.completion_tokens == 60
    alone = free()  # the same text as beside the constrained requests: nothing leaked across rows
    assert alone.choices[0].message.content == frees[0].result().choices[0].message.content


@pytest.mark.parametrize("spec,words", [
    ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "nonsense"),
    ({"grammar": "start: missing"}, "missing"),
    ({"grammar": 'start: <no_such_token> "x"'}, "no_such_token"),  # only the engine's tokenizer knows
])
def test_a_bad_grammar_is_a_400(client, spec, words):
    with pytest.raises(openai.BadRequestError) as e:
        structured(client, spec)
    assert words in e.value.body["message"]
    assert structured(client, {"json": SCHEMA}, seed=2).choices[0].finish_reason == "stop"


def test_logit_bias_forces_a_token(client, tokenizer):
    token = tokenizer.encode(" ok", add_special_tokens=False)[0]
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=1.0,
                                    logit_bias={str(token): 100})
    assert out.choices[0].text == tokenizer.decode([token] * 6)


def test_min_tokens_suppresses_eos(client):
    want_to_stop = {str(EOS): 100}
    out = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, logit_bias=want_to_stop)
    assert out.usage.completion_tokens == 1 and out.choices[0].message.content == ""
    out = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, logit_bias=want_to_stop,
                                         extra_body={"min_tokens": 5})
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "stop"


def test_repetition_penalty_changes_greedy_output(client):
    def greedy(**extra):
        return client.completions.create(model=MODEL, prompt="the the the", max_tokens=24, temperature=0.0,
                                         extra_body={"ignore_eos": True, **extra}).choices[0].text

    assert greedy() == greedy()
    assert greedy(repetition_penalty=2.0) != greedy()


def test_logprobs_of_greedy_tokens_are_the_top_alternative(client):
    out = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0.0,
                                         logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 8
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and len(tops) == 5
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(tops[0])
        assert entry.logprob <= 0


def test_nothing_leaks(live):
    """Once idle (every test above finished or was refused), no KV page is held."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and live.fake.stats().get("pages_used", 1) != 0:
        time.sleep(0.1)
    assert live.fake.stats()["pages_used"] == 0
