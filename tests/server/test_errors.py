"""Errors in the OpenAI shape (Anthropic's under /v1/messages), with the right status codes."""

from __future__ import annotations

import json
import logging
import socket
import time

import anthropic
import openai
import pytest

from .conftest import MODEL, wait_until

CHAT = "/v1/chat/completions"


def _openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    assert "Traceback" not in response.text
    return body["error"]


def _anthropic_error(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]


def test_bad_json(served):
    with served.http() as http:
        r = http.post(CHAT, content=b'{"model": "tiny-llama", "messages": [', headers={"content-type": "application/json"})
        assert "JSON" in _openai_error(r, 400)["message"]
        r = http.post("/v1/messages", content=b"{nope", headers={"content-type": "application/json"})
        _anthropic_error(r, 400, "invalid_request_error")


def test_missing_and_invalid_fields_name_the_field(served):
    with served.http() as http:
        err = _openai_error(http.post(CHAT, json={"model": MODEL}), 400, "messages")
        assert "messages" in err["message"]
        err = _openai_error(http.post(CHAT, json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
        assert err["param"] == "messages.0.role"
        _openai_error(http.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], "temperature": 9}),
                      400, "temperature")
        err = _anthropic_error(http.post("/v1/messages", json={"model": MODEL, "messages": [
            {"role": "user", "content": "x"}]}), 400, "invalid_request_error")
        assert "max_tokens" in err["message"]


def test_unsupported_options_are_400(served):
    msgs = [{"role": "user", "content": "x"}]
    with served.http() as http:
        _openai_error(http.post(CHAT, json={"messages": msgs, "n": 17}), 400, "n")
        _openai_error(http.post("/v1/completions", json={"prompt": "x", "n": 0}), 400, "n")
        _openai_error(http.post(CHAT, json={"messages": msgs, "response_format": {"type": "xml"}}), 400,
                      "response_format.type")
        _openai_error(http.post(CHAT, json={"messages": msgs, "response_format": {}}), 400,
                      "response_format.type")
        _openai_error(http.post(CHAT, json={"messages": msgs, "response_format": {"type": "json_schema"}}),
                      400, "response_format.json_schema.schema")
        _openai_error(http.post(CHAT, json={"messages": msgs, "top_logprobs": 2}), 400, "top_logprobs")
        _openai_error(http.post(CHAT, json={"messages": msgs, "structured_outputs": {"regex": "a"}}),
                      400, "structured_outputs")
        _openai_error(http.post(CHAT, json={"messages": msgs, "structured_outputs": {"json_object": True},
                                            "response_format": {"type": "json_object"}}), 400, "structured_outputs")
        _openai_error(http.post("/v1/completions", json={"prompt": "x", "echo": True}), 400, "echo")
        _openai_error(http.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt")
        _openai_error(http.post(CHAT, json={"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "http://x"}}]}]}), 400, "messages.0.content.0")
        _anthropic_error(http.post("/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "tool_result"}]}]}), 400, "invalid_request_error")


def test_unknown_model_is_404_like_vllm(served):
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with served.http() as http:
        _anthropic_error(http.post("/v1/messages", json={"model": "claude-x", "max_tokens": 5, "messages": [
            {"role": "user", "content": "x"}]}), 404, "not_found_error")


def test_prompt_too_long_is_400(served):
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * 3997, max_tokens=200)
    assert "maximum context length is 4096" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 5000}])
    a = anthropic.Anthropic(base_url=served.base_url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as ae:
        a.messages.create(model=MODEL, max_tokens=4000, messages=[{"role": "user", "content": "y " * 200}])
    assert ae.value.body["error"]["type"] == "invalid_request_error"
    assert served.fake.requests == []  # nothing reached the engine


def test_engine_rejection_before_and_during_stream(served):
    served.fake.reject = "prompt needs more KV pages than the pool has"
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert "KV pages" in e.value.message
    with pytest.raises(openai.APIError) as e:
        list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True))
    assert "KV pages" in str(e.value)
    with served.http() as http, http.stream("POST", "/v1/messages", json={
            "model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
        lines = list(r.iter_lines())
    assert "event: error" in lines and any("KV pages" in line for line in lines)


def test_unknown_route_and_method(served):
    with served.http() as http:
        _openai_error(http.get("/v1/nothing"), 404)
        _openai_error(http.get(CHAT), 405)


def test_api_key_required_when_configured(served_with_key):
    base = served_with_key.base_url
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    ok = openai.OpenAI(base_url=f"{base}/v1", api_key="sekrit", max_retries=0)
    assert ok.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}]).choices
    assert anthropic.Anthropic(base_url=base, api_key="sekrit", max_retries=0).messages.create(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "x"}]).content
    with served_with_key.http() as http:
        assert http.get("/health").status_code == 200  # health stays open for probes
        for path in ("/stats", "/metrics"):  # the prefix-cache counter would leak what was cached
            _openai_error(http.get(path), 401)
            assert http.get(path, headers={"x-api-key": "sekrit"}).status_code == 200
            assert http.get(path, headers={"authorization": "Bearer sekrit"}).status_code == 200
        _openai_error(http.post(CHAT, json={}, headers={"authorization": "Bearer nope"}), 401)


def test_unexpected_failure_is_500_without_traceback(served):
    served.fake.fail_after, served.fake.failure = 2, RuntimeError("boom: engine bug with a secret traceback")
    with served.http() as http:
        r = http.post(CHAT, json={"messages": [{"role": "user", "content": "x"}]})
        err = _openai_error(r, 500)
        assert "boom" not in r.text and err["type"] == "server_error"
        r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 9, "messages": [{"role": "user", "content": "x"}]})
        _anthropic_error(r, 500, "api_error")
        with http.stream("POST", CHAT, json={"messages": [{"role": "user", "content": "x"}], "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and '"server_error"' in lines[-2] and "boom" not in "".join(lines)
    rid = served.fake.requests[-1].rid
    assert rid not in served.fake.running


def test_a_client_that_pipelines_and_closes_is_one_log_line_not_a_traceback(served, caplog):
    """Three requests pipelined on one connection, the first answer read, the socket closed:
    sending the later answers fails in the transport (uvloop: "unable to perform operation on
    <TCPTransport closed=True>"), which was logged as an unhandled error with its traceback."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", served.port)) as s:
                s.sendall(request * 3)
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert wait_until(lambda: len(served.fake.requests) >= 4 and not served.fake.running)
        time.sleep(0.2)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    with served.http() as http:
        assert http.post(CHAT, json={"messages": [{"role": "user", "content": "x"}]}).status_code == 200
