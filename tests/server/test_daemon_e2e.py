"""The frontend with the real daemon (`tokenspeed up`: tiny model on CPU, real engine, real
scheduler): what the fake engine cannot show — real token streams, real aborts, real stats,
hostile input that never reaches or harms the real engine."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from appliance.tui.app import TopApp
from appliance.tui.source import StatsSource

from .conftest import MODEL, REPO, wait_until
from .test_hostile_input import BASE, FIELDS, ISSUE_16_CASES, RAW_BODIES, assert_api_error, post_raw
from .test_limits import read_response, request_head

pytestmark = pytest.mark.slow

pytestmark = pytest.mark.slow  # spawns processes / > 5 s: skipped by -m 'not slow'


class Daemon:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder = Path(tempfile.mkdtemp(prefix="tsd-", dir="/tmp"))
        self.socket = self.folder / "d.sock"
        self.log = self.folder / "daemon.log"
        env = {**os.environ, "TOKENSPEED_CACHE": str(REPO / ".cache" / "test")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "up", "--set", f"server.port={self.port}",
             "--set", f"server.socket={self.socket}", "--set", "model.preset=tiny-llama"],
            cwd=REPO, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 240) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with self.uds() as http:
                    return http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(healthy, timeout):
            raise RuntimeError(f"daemon not healthy:\n{self.log.read_text()}")

    def uds(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://ts", timeout=60)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        d.wait_healthy()
        yield d
    finally:
        code = d.stop()
    assert code == 0, d.log.read_text()
    assert not d.socket.exists()


def _idle(d: Daemon) -> bool:
    with d.uds() as http:
        stats = http.get("/stats").json()
    return stats["active"] == [] and stats["requests"]["running"] == 0 and stats["requests"]["waiting"] == 0


def test_socket_is_private(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600


def test_stream_equals_non_stream_and_stop_string_cuts_real_text(daemon):
    client = daemon.openai()
    args = {"model": MODEL, "messages": [{"role": "user", "content": "Explain the cache."}],
            "max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert len(full) > 12
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    out = client.chat.completions.create(**args, stop=[stop])
    assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(**args, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut
    assert wait_until(lambda: _idle(daemon), 10)  # the early stop freed the request in the engine


def test_live_stats_then_disconnect_aborts_in_engine(daemon):
    body = {"model": MODEL, "prompt": "stream for a long time", "max_tokens": 3000, "stream": True,
            "temperature": 0, "ignore_eos": True, "user": "e2e-user"}
    stats = None
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"http://127.0.0.1:{daemon.port}/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = 0
        for line in response.iter_lines():
            lines += line.startswith("data: ")
            if lines == 20:  # still streaming: look at /stats (leaving the loop disconnects)
                with daemon.uds() as uds:
                    stats = uds.get("/stats").json()
                break
    assert stats is not None
    (active,) = stats["active"]
    assert active["user"] == "e2e-user" and active["generated_tokens"] >= 20 and active["decode_tps"] > 0
    assert stats["throughput"]["generation_tokens_per_minute"] >= 20
    step_time = stats["step_time"]  # the cost model against the engine's measured steps
    assert step_time["window_steps"] > 0 and step_time["measured_ms"] > 0
    assert step_time["abs_error_ms"] >= 0 and step_time["predicted_ms"] > 0
    assert wait_until(lambda: _idle(daemon), 15)
    time.sleep(1.0)  # several engine stats periods: the snapshots below are fresh
    with daemon.uds() as uds:
        after = uds.get("/stats").json()
        time.sleep(0.5)
        later = uds.get("/stats").json()
    assert after["kv"]["pages_used"] == 0 and after["requests"]["running"] == 0
    assert later["totals"]["generation_tokens"] == after["totals"]["generation_tokens"]  # decoding stopped
    assert after["totals"]["generation_tokens"] < stats["totals"]["generation_tokens"] + 2000  # long before 3000


def test_anthropic_count_tokens_matches_usage(daemon):
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{daemon.port}", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages, system="Be short.")
    message = client.messages.create(model=MODEL, max_tokens=5, messages=messages, system="Be short.")
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens > 5
    assert 1 <= message.usage.output_tokens <= 5


@pytest.mark.anyio
async def test_top_dashboard_reads_the_real_daemon(daemon):
    app = TopApp(StatsSource(str(daemon.socket)), interval_s=0.1)
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(100):
            if app.reachable:
                break
            await pilot.pause(0.05)
        assert app.reachable is True
        assert app.stats["model"] == MODEL and app.stats["kv"]["pages_total"] == 1024
        assert "of 1,024 pages" in str(app.query_one("#kv").render())
        await pilot.press("q")
    assert not app.is_running


def _pages_used(d: Daemon) -> int:
    time.sleep(1.0)  # several engine stats periods: the snapshot is fresh
    with d.uds() as http:
        return http.get("/stats").json()["kv"]["pages_used"]


def test_hostile_requests_are_4xx_and_the_daemon_serves_on(daemon):
    """Issue 16 item 1 against the real engine: one value of every field per endpoint, every
    malformed body, a declared 50 MB body; each is a 4xx, then normal requests are served and
    no KV page is held."""
    assert wait_until(lambda: _idle(daemon), 15)
    idle_pages = _pages_used(daemon)
    tried = 0
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=60) as http:
        for path, body, _ in ISSUE_16_CASES:
            assert_api_error(path, post_raw(http, path, body), 400)
            tried += 1
        for path, fields in FIELDS.items():
            for name, values in fields.items():
                assert_api_error(path, post_raw(http, path, {**BASE[path], name: values[0]}))
                tried += 1
            for raw in RAW_BODIES.values():
                assert_api_error(path, post_raw(http, path, raw), 400)
                tried += 1
        for path in BASE:  # the issue's 50 MB prompt: refused from its declared length
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
                sock.sendall(request_head(path, content_length=50_000_000) + b'{"messages": "')
                status, _ = read_response(sock)
            assert status == 413
            tried += 1
        assert daemon.proc.poll() is None
        chat = http.post("/v1/chat/completions", json={**BASE["/v1/chat/completions"], "max_tokens": 8,
                                                       "top_k": 2**31 - 1, "seed": -(2**63)})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
        message = http.post("/v1/messages", json={**BASE["/v1/messages"], "max_tokens": 8})
        assert message.status_code == 200 and message.json()["usage"]["output_tokens"] >= 1
    assert tried > 130
    assert wait_until(lambda: _idle(daemon), 15)
    assert _pages_used(daemon) == idle_pages


def _metric(d: Daemon, name: str) -> float:
    with d.uds() as http:
        text = http.get("/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"tokenspeed_{name} "))


def test_claude_code_loop_reports_cached_tokens_and_metrics_are_current(daemon):
    """A 3-turn /v1/messages conversation with tools and cache_control blocks: turns 2 and 3
    read the earlier turns' KV from the prefix cache, cache_read_input_tokens says how many
    (what the /metrics counter moved by), and /metrics is current when each reply returns."""
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{daemon.port}", api_key="x", max_retries=0)
    tools = [{"name": "Read", "description": "Read a file from the repository",
              "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}},
                               "required": ["file_path"]}, "cache_control": {"type": "ephemeral"}}]
    system = [{"type": "text", "text": "You are a coding agent working in a Python repository. " * 6,
               "cache_control": {"type": "ephemeral"}}]
    messages: list = []
    for turn, ask in enumerate(["Where is the scheduler?", "And the sampler?", "Summarize both."]):
        messages.append({"role": "user", "content": [{"type": "text", "text": ask,
                                                      "cache_control": {"type": "ephemeral"}}]})
        hits, generated = _metric(daemon, "prefix_cache_hit_tokens_total"), _metric(daemon, "generation_tokens_total")
        reply = client.messages.create(model=MODEL, max_tokens=12, extra_body={"temperature": 0}, system=system, tools=tools,
                                       messages=messages, metadata={"user_id": "user_e2e_account_1_session_cc-3"})
        usage = reply.usage
        assert _metric(daemon, "prefix_cache_hit_tokens_total") - hits == usage.cache_read_input_tokens
        assert _metric(daemon, "generation_tokens_total") - generated == usage.output_tokens  # no lag
        if turn:
            assert usage.cache_read_input_tokens > 0
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content
                                                          if b.type != "text" or b.text]
                         or [{"type": "text", "text": "."}]})


def test_responses_and_n_choices_through_the_real_engine(daemon):
    client = daemon.openai()
    first = client.responses.create(model=MODEL, instructions="You are Codex. " * 8, input="list the files",
                                    max_output_tokens=6, temperature=0, store=False)
    assert first.status in ("completed", "incomplete") and first.usage.output_tokens >= 1
    history = [{"role": "user", "content": "list the files"},
               *[item.model_dump(exclude_none=True) for item in first.output],
               {"role": "user", "content": "now the tests"}]
    with client.responses.stream(model=MODEL, instructions="You are Codex. " * 8, input=history,
                                 max_output_tokens=6, temperature=0) as stream:
        last = list(stream)[-1]  # response.incomplete when cut at max_output_tokens
    assert last.type in ("response.completed", "response.incomplete")
    second = last.response
    assert second.usage.input_tokens_details.cached_tokens > 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "pick"}], n=2,
                                          seed=3, max_tokens=8, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 16


def test_forced_tool_calls_and_schemas_hold_on_random_weights(daemon):
    """Whatever the random weights say, a forced tool choice (Responses, chat, messages) gives
    exactly one call with schema-valid arguments, and a response_format schema is met (string
    lengths are bounded, so the grammar ends each call inside its token budget)."""
    client = daemon.openai()
    shell = {"type": "function", "name": "shell", "parameters": {
        "type": "object", "properties": {"command": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
        "required": ["command"], "additionalProperties": False}}
    out = client.responses.create(model=MODEL, input="list files", tools=[shell], tool_choice="required",
                                  parallel_tool_calls=False, max_output_tokens=200)
    (call,) = [item for item in out.output if item.type == "function_call"]
    assert call.name == "shell" and isinstance(json.loads(call.arguments)["command"], list)
    follow = client.responses.create(model=MODEL, max_output_tokens=8, tools=[shell], input=[
        {"role": "user", "content": "list files"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "a.py"}])
    assert follow.status in ("completed", "incomplete")

    weather = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
               "properties": {"city": {"type": "string", "maxLength": 8},
                              "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], max_tokens=200, parallel_tool_calls=False,
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": weather}}],
        tool_choice="required")
    (tool_call,) = chat.choices[0].message.tool_calls
    arguments = json.loads(tool_call.function.arguments)
    assert chat.choices[0].finish_reason == "tool_calls" and len(arguments["city"]) <= 8
    assert 1 <= arguments["days"] <= 7
    claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{daemon.port}", api_key="x", max_retries=0)
    message = claude.messages.create(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "x"}],
                                     tools=[{"name": "get_weather", "input_schema": weather}],
                                     tool_choice={"type": "any", "disable_parallel_tool_use": True})
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and set(use.input) == {"city", "days"}
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=200,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "w", "schema": weather}})
    assert set(json.loads(out.choices[0].message.content)) == {"city", "days"}
