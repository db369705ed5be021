"""The sampling fields of the OpenAI endpoints through the real `openai` SDK (fake engine): each
reaches the engine request as given, bad values are 400s naming the field, and logprobs are
rendered in OpenAI's shapes (the SDK parses them; streamed chunks add up to the whole)."""

from __future__ import annotations

import json

import openai
import pytest

from .conftest import MODEL

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)


def test_fields_reach_the_engine_request(client, served):
    client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=20, logit_bias={"17": 5.5, "3": -100},
        presence_penalty=0.5, frequency_penalty=-1.25, logprobs=True, top_logprobs=4,
        extra_body={"repetition_penalty": 1.3, "min_tokens": 2,
                    "structured_outputs": {"json": {"type": "object"}}})
    req = served.fake.requests[-1]
    assert req.logit_bias == {17: 5.5, 3: -100.0}
    assert (req.presence_penalty, req.frequency_penalty, req.repetition_penalty) == (0.5, -1.25, 1.3)
    assert (req.min_tokens, req.logprobs) == (2, 4)
    assert req.constraint.kind == "json_schema" and json.loads(req.constraint.spec) == {"type": "object"}
    client.completions.create(model=MODEL, prompt="x", max_tokens=3, logprobs=0,
                              extra_body={"structured_outputs": {"grammar": 'start: "a"'}})
    req = served.fake.requests[-1]
    assert req.logprobs == 0 and req.constraint.kind == "lark" and req.constraint.spec == 'start: "a"'
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3,
                                   extra_body={"structured_outputs": {"json_object": True}})
    assert served.fake.requests[-1].constraint.kind == "json_object"


def test_defaults_ask_for_nothing(client, served):
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, logprobs=False)
    req = served.fake.requests[-1]
    assert (req.logit_bias, req.repetition_penalty, req.presence_penalty, req.frequency_penalty,
            req.min_tokens, req.logprobs, req.constraint) == ({}, 1.0, 0.0, 0.0, 0, None, None)


@pytest.mark.parametrize("extra,param", [
    ({"structured_outputs": {"json": {"type": 12}}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
    ({"logit_bias": {"1000": 1.0}}, "logit_bias"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
])
def test_bad_values_are_400_naming_the_field(client, served, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, extra_body=extra)
    assert e.value.body["param"] == param
    assert not served.fake.requests


def test_chat_logprobs_whole_and_streamed(client, served, tokenizer):
    served.fake.reply = "Hello there"
    whole = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, logprobs=True,
                                           top_logprobs=2)
    content = whole.choices[0].logprobs.content
    ids = tokenizer.encode("Hello there", add_special_tokens=False)
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in ids]  # not the final EOS
    assert [c.logprob for c in content] == pytest.approx([-0.1 * (i + 1) for i in range(len(ids))])
    assert all(bytes(c.bytes).decode() == c.token for c in content)
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, logprobs=True,
                                                 top_logprobs=2, stream=True))
    streamed = [c for chunk in chunks for choice in chunk.choices if choice.logprobs
                for c in choice.logprobs.content]
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert text == "Hello there"


def test_chat_without_logprobs_has_none(client, served):
    out = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5)
    assert out.choices[0].logprobs is None


def test_completion_logprobs_whole_and_streamed(client, served, tokenizer):
    served.fake.reply = "abc def"
    whole = client.completions.create(model=MODEL, prompt="x", max_tokens=20, logprobs=3)
    lp = whole.choices[0].logprobs
    text = whole.choices[0].text
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs)
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=20, logprobs=3, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == lp.tokens
    assert sum((p.text_offset for p in parts), []) == lp.text_offset
    assert sum((p.token_logprobs for p in parts), []) == pytest.approx(lp.token_logprobs)
