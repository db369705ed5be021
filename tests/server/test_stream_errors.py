"""A request whose engine stream fails (the engine died, refused it, or broke) ends with an error
in the API's shape: an SSE error event on streams (OpenAI: a data chunk with an `error` object,
then `[DONE]`; Anthropic: `event: error`; Responses: `error` then `response.failed`), a 5xx
otherwise; never an ordinary finish."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from appliance.engine.client import EngineRejected
from appliance.server import generation

from .conftest import MODEL

USER = [{"role": "user", "content": "x"}]
STREAMS = {
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "stream": True},
    "/v1/completions": {"model": MODEL, "prompt": "x", "stream": True},
    "/v1/messages": {"model": MODEL, "max_tokens": 50, "messages": USER, "stream": True},
    "/v1/responses": {"model": MODEL, "input": "x", "stream": True},
}


class EngineDied(EngineRejected):
    """What the supervised EngineClient raises into every in-flight stream when a rank dies."""


# failure -> (HTTP status of the error, OpenAI type, Anthropic type, words in the message)
FAILURES = {
    "engine-died": (EngineDied("the engine process died; restarting"), 503, "service_unavailable",
                    "overloaded_error", "engine process died"),
    "engine-bug": (RuntimeError("boom: secret"), 500, "server_error", "api_error", "Internal server error"),
    "stream-ended": (None, 503, "service_unavailable", "overloaded_error", "engine stopped"),
}


def _stream_lines(served, path: str) -> list[str]:
    with served.http() as http, http.stream("POST", path, json=STREAMS[path]) as response:
        assert response.status_code == 200  # the stream had started when the engine failed
        return [line for line in response.iter_lines() if line]


@pytest.mark.parametrize("path", list(STREAMS))
@pytest.mark.parametrize("kind", list(FAILURES))
def test_stream_that_fails_ends_with_an_error_event(served, path, kind):
    failure, status, openai_type, anthropic_type, words = FAILURES[kind]
    served.fake.fail_after, served.fake.failure = 2, failure
    lines = _stream_lines(served, path)
    text = "\n".join(lines)
    assert "secret" not in text and "Traceback" not in text
    assert _text_before_error(path, lines)  # the tokens before the failure were sent
    if path == "/v1/messages":
        assert lines[-2] == "event: error" and "message_delta" not in text and "message_stop" not in text
        error = json.loads(lines[-1].removeprefix("data: "))["error"]
        assert error["type"] == anthropic_type
    elif path == "/v1/responses":
        assert lines[-4] == "event: error" and lines[-2] == "event: response.failed"
        assert "response.completed" not in text and "response.incomplete" not in text
        error = json.loads(lines[-3].removeprefix("data: "))
        assert error["code"] == openai_type
        failed = json.loads(lines[-1].removeprefix("data: "))["response"]
        assert failed["status"] == "failed" and failed["error"]["message"] == error["message"]
    else:
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["type"] == openai_type and set(error) == {"message", "type", "param", "code"}
        assert '"finish_reason":"' not in text  # no ordinary finish (abort or other)
    assert words in error["message"]


def _text_before_error(path: str, lines: list[str]) -> str:
    parts = []
    for line in lines:
        data = json.loads(line[6:]) if line.startswith("data: {") else {}
        if path == "/v1/messages" and data.get("type") == "content_block_delta":
            parts.append(data["delta"]["text"])
        if data.get("type") == "response.output_text.delta":
            parts.append(data["delta"])
        for choice in data.get("choices", []):
            parts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(parts)


@pytest.mark.parametrize("kind", list(FAILURES))
def test_non_streamed_request_that_fails_is_a_5xx(served, kind):
    failure, status, openai_type, anthropic_type, _ = FAILURES[kind]
    served.fake.fail_after, served.fake.failure = 2, failure
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=USER)
    assert e.value.status_code == status and e.value.body["type"] == openai_type
    a = anthropic.Anthropic(base_url=served.base_url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as ae:
        a.messages.create(model=MODEL, max_tokens=50, messages=USER)
    assert ae.value.status_code == status and ae.value.body["error"]["type"] == anthropic_type


def test_sdks_raise_on_the_error_event(served):
    """What a client sees: the SDKs turn the error event into an exception mid-iteration."""
    served.fake.fail_after, served.fake.failure = 2, EngineDied("the engine process died")
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="engine process died"):
        list(client.chat.completions.create(model=MODEL, messages=USER, stream=True))
    a = anthropic.Anthropic(base_url=served.base_url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError, match="engine process died"):
        list(a.messages.create(model=MODEL, max_tokens=50, messages=USER, stream=True))


def test_refusal_before_the_first_token_is_400_unless_the_engine_is_down(served):
    served.fake.reject = "prompt needs more KV pages than the pool has"
    lines = _stream_lines(served, "/v1/chat/completions")
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["type"] == "invalid_request_error"
    served.fake.healthy = False  # an engine known to be down refuses before the stream starts
    try:
        with served.http() as http:
            r = http.post("/v1/chat/completions", json=STREAMS["/v1/chat/completions"])
    finally:
        served.fake.healthy = True
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("path", list(STREAMS))
def test_a_request_into_an_engine_restart_is_a_503_with_retry_after(served, path, stream):
    """QA: a stream asked for while the engine restarted got 200 and an error event, which no SDK
    retries (the openai client with max_retries=3 failed in 0.04 s), and a whole response a 503
    without Retry-After. Both are now refused before any response starts, as during warm-up."""
    served.fake.healthy, served.fake.status = False, "restarting"
    try:
        with served.http() as http:
            r = http.post(path, json={**STREAMS[path], "stream": stream})
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            error = r.json()["error"]
            assert error["type"] == ("overloaded_error" if path == "/v1/messages"
                                     else "service_unavailable")
            assert "restarting" in error["message"]
            served.fake.status = "failed"  # not coming back: no Retry-After
            r = http.post(path, json={**STREAMS[path], "stream": stream})
            assert r.status_code == 503 and "retry-after" not in r.headers
    finally:
        served.fake.healthy = True
        vars(served.fake).pop("status", None)


def test_the_sdk_retries_a_stream_refused_during_a_restart(served, monkeypatch):
    """The openai SDK waits Retry-After and asks again: a stream that lands in a restart gets
    its answer once the engine is back."""
    monkeypatch.setattr(generation, "RETRY_AFTER_S", 1)
    served.fake.healthy, served.fake.status = False, "restarting"
    statuses = []

    def back(response):  # the first try was refused; the engine is back for the retry
        statuses.append(response.status_code)
        served.fake.healthy = True
        vars(served.fake).pop("status", None)

    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="x", max_retries=1,
                           http_client=openai.DefaultHttpxClient(event_hooks={"response": [back]}))
    try:
        stream = client.chat.completions.create(model=MODEL, messages=USER, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert statuses == [503, 200]
    finally:
        served.fake.healthy = True
        vars(served.fake).pop("status", None)
