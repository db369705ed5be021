"""The walking skeleton end to end: the real daemon process, real SDK clients."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import anthropic
import openai
import pytest
import torch

from daemon_process import REPO, launch_daemon, start_daemon, wait_healthy

pytestmark = pytest.mark.slow  # spawns processes / > 5 s: skipped by -m 'not slow'


def _openai(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0)


def test_health_and_models(daemon):
    client = _openai(daemon)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    with daemon.uds_client() as http:
        assert http.get("/health").status_code == 200


def test_streamed_chat_through_openai_sdk(daemon):
    client = _openai(daemon)
    stream = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Write a haiku about caches."}],
        max_tokens=12, temperature=0.0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert finish and finish[-1] in ("stop", "length")
    assert usage is not None and 1 <= usage.completion_tokens <= 12 and usage.prompt_tokens > 5
    assert isinstance(text, str)


def test_chat_is_deterministic_at_temperature_zero(daemon):
    client = _openai(daemon)
    messages = [{"role": "user", "content": "def fib(n):"}]
    a = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16, temperature=0)
    b = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == b.usage.completion_tokens


def test_greedy_tokens_equal_transformers(daemon):
    """The daemon's greedy continuation equals HF transformers' generate on the same checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(os.environ.get("TOKENSPEED_CACHE", REPO / ".cache" / "test")) / "models" / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    prompt = "The quick brown fox jumps over"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, ids.shape[1]:]
    got = _openai(daemon).completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=20, temperature=0,
        extra_body={"ignore_eos": True})
    assert got.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)


def test_concurrent_requests_all_finish(daemon):
    client = _openai(daemon)
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        out = client.completions.create(model="tiny-llama", prompt=f"request {i} " * (i + 1),
                                        max_tokens=8 + i, temperature=0.7, seed=i)
        results[i] = out.choices[0].finish_reason

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(6))
    assert set(results.values()) <= {"stop", "length"}


def test_streaming_over_unix_socket(daemon):
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6, "stream": True}
    with daemon.uds_client() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk"


def test_anthropic_sdk_messages(daemon):
    client = anthropic.Anthropic(base_url=daemon.base_url, api_key="unused", max_retries=0)
    message = client.messages.create(model="tiny-llama", max_tokens=8,
                                     messages=[{"role": "user", "content": "hello"}])
    assert message.role == "assistant" and message.stop_reason in ("end_turn", "max_tokens")
    with client.messages.stream(model="tiny-llama", max_tokens=8,
                                messages=[{"role": "user", "content": "hello"}]) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens >= 1


def test_bad_requests_get_api_errors(daemon):
    client = _openai(daemon)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-llama", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-llama", prompt="x " * 5000, max_tokens=4)
    # The daemon is still healthy afterwards.
    assert client.completions.create(model="tiny-llama", prompt="ok", max_tokens=2).choices


def test_status_and_stats(daemon):
    result = daemon.cli("status")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["health"] is True
    assert status["kv"]["pages_total"] == 1024
    assert status["totals"]["generation_tokens"] > 0


def test_metrics_exposed(daemon):
    with daemon.uds_client() as http:
        text = http.get("/metrics").text
    for name in ("tokenspeed_kv_pages_total", "tokenspeed_kv_pages_used", "tokenspeed_requests_running",
                 "tokenspeed_generation_tokens_total", "tokenspeed_time_to_first_token_seconds"):
        assert name in text


def test_sigterm_drains_in_flight_request_and_exits_zero(tmp_path):
    daemon = start_daemon(tmp_path)
    client = _openai(daemon)
    stream = client.completions.create(model="tiny-llama", prompt="drain me", max_tokens=3500,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices
    code = daemon.stop()
    # Too long to finish within the grace period: the daemon aborts it, and the stream still ends
    # properly (a final chunk with a finish reason, then [DONE]) instead of a cut connection.
    rest = list(stream)
    assert code == 0, daemon.log.read_text()
    assert not daemon.socket.exists()
    assert rest and rest[-1].choices[0].finish_reason is not None


def test_health_says_warming_up_while_the_engine_loads(tmp_path):
    """The sockets answer from before the engine starts (spawning a rank alone takes seconds):
    503 "warming up", the API's error shapes; then the real app takes the same sockets over."""
    daemon = launch_daemon(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not daemon.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with daemon.uds_client() as http:
            health = http.get("/health")
            chat = http.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": []})
            messages = http.post("/v1/messages", json={})
        assert (health.status_code, health.json()) == (503, {"status": "warming up"})
        assert chat.status_code == 503 and chat.headers["retry-after"] == "5"
        assert chat.json()["error"]["type"] == "service_unavailable"
        assert messages.status_code == 503 and messages.json()["type"] == "error"
        wait_healthy(daemon)
        reply = _openai(daemon).completions.create(model="tiny-llama", prompt="hi", max_tokens=3)
        assert reply.choices[0].text is not None
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log.read_text()
    assert not daemon.socket.exists()


def test_second_turn_reuses_every_full_page_of_the_first(daemon):
    """Turn 2 = turn 1's prompt + its answer (exact token ids) + a new message: every full KV
    page of turn 1 comes from the prefix cache."""
    import time

    import httpx

    def hits(http: httpx.Client) -> int:
        time.sleep(0.6)  # the engine publishes its counters every 0.25 s
        return http.get("/stats").json()["totals"]["prefix_cache_hit_tokens"]

    with httpx.Client(base_url=daemon.base_url, timeout=120) as http:
        prompt = [10 + (i * 7) % 400 for i in range(100)]
        first = http.post("/v1/completions", json={
            "model": "tiny-llama", "prompt": prompt, "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}).json()
        answer = first["choices"][0]["token_ids"]
        assert len(answer) == 40
        before = hits(http)
        second = http.post("/v1/completions", json={
            "model": "tiny-llama", "prompt": prompt + answer + list(range(200, 230)),
            "max_tokens": 4, "temperature": 0}).json()
        assert second["usage"]["prompt_tokens"] == 170
        # Turn 1 wrote KV for its 100 prompt tokens and 39 of its 40 answer tokens.
        assert hits(http) - before >= (100 + 39) // 16 * 16


def test_streamed_token_ids_carry_every_token_in_order(daemon):
    """Each chunk carries the ids of the tokens that reached the frontend together (one, or a
    few when they arrived before it streamed the last ones): all of them, once, in order."""
    body = {"model": "tiny-llama", "prompt": [5, 6, 7, 8], "max_tokens": 9, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    with daemon.uds_client() as http:
        whole = http.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")]
    per_chunk = [c["choices"][0].get("token_ids") for c in chunks if c["choices"]]
    assert sum(filter(None, per_chunk), []) == whole and len(whole) == 9


def test_an_idle_daemon_lets_session_pins_expire(tmp_path):
    """A session's pages stay pinned for scheduler.session_ttl_s after its turn; past it they
    go, even with nothing else to run (expiry rode on the next plan: an idle daemon showed
    them used indefinitely)."""
    import httpx

    folder = Path(tempfile.mkdtemp(prefix="tse-", dir="/tmp"))  # Unix socket paths are short
    daemon = start_daemon(folder, "scheduler.session_ttl_s=1")
    try:
        body = {"model": "tiny-llama", "prompt": "a session turn " * 20, "max_tokens": 4}
        r = httpx.post(daemon.base_url + "/v1/completions", json=body, timeout=60,
                       headers={"x-session-id": "agent-1"})
        assert r.status_code == 200, r.text

        def kv() -> dict:
            with daemon.uds_client() as http:
                return http.get("/stats").json()["kv"]

        time.sleep(0.6)  # the engine publishes its stats every 0.25 s
        assert kv()["pages_pinned"] > 0
        deadline = time.monotonic() + 10
        while kv()["pages_pinned"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert kv()["pages_pinned"] == 0 and kv()["pages_used"] == 0
    finally:
        daemon.stop()
