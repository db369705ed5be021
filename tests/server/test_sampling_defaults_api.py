"""The model's sampling defaults (generation_config.json, read at start-up) through every
endpoint and its real SDK (fake engine): a request that leaves a field out gets the model's
value, a field it sends wins, and a top_k of 0 sent turns top-k off."""

from __future__ import annotations

import anthropic
import openai
import pytest

from appliance.engine.sampling_defaults import SamplingDefaults

from .conftest import MODEL, serve_in_thread

QWEN_CODER = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served_qwen(tokenizer):
    with serve_in_thread(tokenizer, sampling_defaults=QWEN_CODER) as served:
        yield served


def _sent(served) -> tuple[float, float, int, float]:
    req = served.fake.requests[-1]
    return req.temperature, req.top_p, req.top_k, req.repetition_penalty


def _openai_chat(served, **fields):
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    extra = {k: fields.pop(k) for k in ("top_k", "repetition_penalty") if k in fields}
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, extra_body=extra, **fields)


def _openai_completion(served, **fields):
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    extra = {k: fields.pop(k) for k in ("top_k", "repetition_penalty") if k in fields}
    client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=extra, **fields)


def _responses(served, **fields):
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    extra = {k: fields.pop(k) for k in ("top_k",) if k in fields}
    client.responses.create(model=MODEL, input="hi", max_output_tokens=4, extra_body=extra, **fields)


def _anthropic(served, **fields):
    client = anthropic.Anthropic(base_url=served.base_url, api_key="unused", max_retries=0)
    # the SDK's newer releases take no sampling arguments; the API still reads them
    client.messages.create(model=MODEL, messages=USER, max_tokens=4, extra_body=fields)


ENDPOINTS = {"chat": _openai_chat, "completions": _openai_completion, "responses": _responses,
             "messages": _anthropic}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_fields_left_out_get_the_models_defaults(served_qwen, endpoint):
    served_qwen.fake.reset()
    ENDPOINTS[endpoint](served_qwen)
    assert _sent(served_qwen) == (0.7, 0.8, 20, 1.05)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_fields_sent_win_and_top_k_zero_turns_it_off(served_qwen, endpoint):
    served_qwen.fake.reset()
    ENDPOINTS[endpoint](served_qwen, temperature=0.2, top_k=0)
    assert _sent(served_qwen) == (0.2, 0.8, 0, 1.05)
    ENDPOINTS[endpoint](served_qwen, top_p=0.5)
    assert _sent(served_qwen) == (0.7, 0.5, 20, 1.05)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_repetition_penalty_sent_wins(served_qwen, endpoint):
    served_qwen.fake.reset()
    ENDPOINTS[endpoint](served_qwen, repetition_penalty=1.0)
    assert _sent(served_qwen)[3] == 1.0


def test_without_model_defaults_the_apis_own_apply(served):
    _openai_chat(served)
    assert _sent(served) == (1.0, 1.0, 0, 1.0)
    _anthropic(served)
    assert _sent(served) == (1.0, 1.0, 0, 1.0)
