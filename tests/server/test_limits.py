"""Limits that keep one client from holding the frontend: the body size (`server.max_body_bytes`,
413), the tokenizer pool (long prompts do not hold short ones; 429 when its queue is full), the
header deadline and the keep-alive idle timeout; and a request that does not parse as HTTP."""

from __future__ import annotations

import copy
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from appliance.config import ConfigError, load_config
from appliance.server import body_limit, connection, prompt
from appliance.server.errors import ApiError
from appliance.server.tokenizer_pool import TokenizerPool

from .conftest import MODEL, Served, serve_in_thread, tiny_checkpoint

CHAT, MESSAGES = "/v1/chat/completions", "/v1/messages"
CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MESSAGES_BODY = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_limit(tokenizer) -> Iterator[Served]:
    with serve_in_thread(tokenizer, max_body_bytes=LIMIT) as served:
        yield served


def _connect(served: Served) -> socket.socket:
    return socket.create_connection(("127.0.0.1", served.port), timeout=10)


def request_head(path: str, **headers: Any) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def _closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _chat_ok(served: Served) -> float:
    """Seconds a normal chat request took; asserts it was served."""
    started = time.monotonic()
    with served.http() as http:
        response = http.post(CHAT, json=CHAT_BODY)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


# --- body size ---------------------------------------------------------------------------------

def test_declared_50mb_prompt_is_refused_before_it_is_read(served):
    """Issue 16: a 50 MB prompt held every other request for 113 s. Its declared length is over
    the default limit (32 MiB): the 413 comes from the headers alone."""
    prompt = json.dumps({**CHAT_BODY, "messages": [{"role": "user", "content": "x" * 50_000_000}]}).encode()
    for path, shape in ((CHAT, "openai"), (MESSAGES, "anthropic")):
        with _connect(served) as sock:
            started = time.monotonic()
            sock.sendall(request_head(path, content_length=len(prompt)) + prompt[:65536])
            status, body = read_response(sock)
            elapsed = time.monotonic() - started
            assert _closed_by_peer(sock, 5)  # the unread body is never parsed as a request
        assert status == 413 and elapsed < 2.0
        if shape == "openai":
            assert "server.max_body_bytes" in body["error"]["message"] and body["error"]["param"] is None
        else:
            assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
    assert _chat_ok(served) < 5
    assert served.fake.requests[-1].max_new_tokens == 4


def test_body_of_exactly_the_limit_is_served_one_byte_more_is_413(small_limit):
    body = dict(CHAT_BODY, user="")
    padding = LIMIT - len(json.dumps(body).encode())
    exact = json.dumps({**body, "user": "u" * padding}).encode()
    assert len(exact) == LIMIT
    with small_limit.http() as http:
        assert http.post(CHAT, content=exact, headers={"content-type": "application/json"}).status_code == 200
        over = http.post(CHAT, content=exact[:-1] + b' }', headers={"content-type": "application/json"})
    assert over.status_code == 413 and over.json()["error"]["type"] == "invalid_request_error"


def test_chunked_body_is_counted_and_a_pending_upload_holds_no_one(small_limit):
    """A body without Content-Length is refused once it passes the limit; while it is still
    arriving (stalled half-way), another client is served."""
    with _connect(small_limit) as sock:
        sock.sendall(request_head(MESSAGES, transfer_encoding="chunked") + _chunk(b'{"messages": "' + b"x" * (LIMIT // 2)))
        assert _chat_ok(small_limit) < 5  # the stalled upload holds no one
        sock.sendall(_chunk(b"x" * LIMIT))
        status, body = read_response(sock)
    assert status == 413 and body["error"]["type"] == "request_too_large"
    assert small_limit.fake.requests[-1].prompt_ids  # the chat request went through


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_a_body_trickling_past_the_deadline_is_408_and_the_connection_closed(served, monkeypatch, path):
    """Headers have a deadline (connection.py); the body now has one too, or a client sending
    a byte now and then would hold its connection and buffer forever."""
    monkeypatch.setattr(body_limit, "BODY_TIMEOUT_S", 1.0)
    with _connect(served) as sock:
        sock.sendall(request_head(path, content_length=100) + b'{"messages": ')
        started = time.monotonic()
        status, body = read_response(sock)
        assert status == 408 and "did not arrive within 1 s" in json.dumps(body)
        assert 0.9 < time.monotonic() - started < 5
        assert _closed_by_peer(sock, 5)
    assert _chat_ok(served) < 5


def test_max_body_bytes_is_a_config_key_with_a_default():
    assert load_config(None, ["device=cpu"]).server.max_body_bytes == 32 * 1024 * 1024
    assert load_config(None, ["server.max_body_bytes=1024"]).server.max_body_bytes == 1024
    for bad in ("0", "-1", "lots", "true"):
        with pytest.raises(ConfigError, match="server.max_body_bytes"):
            load_config(None, [f"server.max_body_bytes={bad}"])


# --- tokenizer pool ----------------------------------------------------------------------------

class GatedTokenizer:
    """The real tokenizer, except that encoding a text with MARKER waits for `gate`."""

    MARKER = "__slow_prompt__"

    def __init__(self, inner: Any, gate: threading.Event, entered: threading.Semaphore) -> None:
        self._inner, self.gate, self.entered = inner, gate, entered

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __deepcopy__(self, memo: dict) -> GatedTokenizer:
        return GatedTokenizer(copy.deepcopy(self._inner, memo), self.gate, self.entered)

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        if self.MARKER in text:
            self.entered.release()
            assert self.gate.wait(20)
        return self._inner.encode(text, **kwargs)


class SlowPrompt:
    """Swaps the served app's tokenizer pool for one over GatedTokenizer; posts slow prompts."""

    def __init__(self, served: Served, tokenizer: Any, workers: int, max_waiting: int) -> None:
        self.served, self.state = served, served.server.config.app.state.tokenspeed
        self.gate, self.entered = threading.Event(), threading.Semaphore(0)
        self.pool = TokenizerPool(GatedTokenizer(tokenizer, self.gate, self.entered), workers, max_waiting)
        self.results: list[int] = []
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> SlowPrompt:
        self.original, self.state.tokenizers = self.state.tokenizers, self.pool
        return self

    def __exit__(self, *exc: Any) -> None:
        self.gate.set()
        for thread in self.threads:
            thread.join(20)
        self.state.tokenizers = self.original

    def post_in_background(self) -> None:
        def run() -> None:
            body = {**CHAT_BODY, "messages": [{"role": "user", "content": GatedTokenizer.MARKER}]}
            with self.served.http() as http:
                self.results.append(http.post(CHAT, json=body).status_code)

        self.threads.append(threading.Thread(target=run, daemon=True))
        self.threads[-1].start()
        assert self.entered.acquire(timeout=10)  # it holds a tokenizer worker now


def test_a_long_tokenization_does_not_hold_short_requests(served, tokenizer):
    with SlowPrompt(served, tokenizer, workers=2, max_waiting=4) as slow:
        slow.post_in_background()
        assert _chat_ok(served) < 5  # served by the other worker
        assert slow.results == []  # the slow one is still tokenizing
        slow.gate.set()
        slow.threads[0].join(20)
    assert slow.results == [200]


def test_a_full_tokenizer_queue_is_429_in_the_apis_shape(served, tokenizer):
    with SlowPrompt(served, tokenizer, workers=1, max_waiting=0) as slow:
        slow.post_in_background()
        with served.http() as http:
            chat = http.post(CHAT, json=CHAT_BODY)
            messages = http.post(MESSAGES, json=MESSAGES_BODY)
        assert chat.status_code == 429 and chat.json()["error"]["type"] == "rate_limit_error"
        assert messages.status_code == 429 and messages.json()["error"]["type"] == "rate_limit_error"
        slow.gate.set()
        slow.threads[0].join(20)
        assert _chat_ok(served) < 5  # the queue drained
    assert slow.results == [200]


@pytest.mark.anyio
async def test_pool_runs_at_most_workers_jobs_each_on_its_own_tokenizer():
    running, peak, seen = 0, 0, set()

    def job(tokenizer: Any) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        seen.add(id(tokenizer))
        time.sleep(0.05)
        running -= 1
        return tokenizer["n"]

    pool = TokenizerPool({"n": 7}, workers=3, max_waiting=10)
    results: list[int] = []

    async def one() -> None:
        results.append(await pool.run(job))

    async with anyio.create_task_group() as tg:
        for _ in range(9):
            tg.start_soon(one)
    assert results == [7] * 9 and peak == 3 and len(seen) == 3


# --- connection timeouts -----------------------------------------------------------------------

def test_headers_must_arrive_within_the_deadline(served, monkeypatch):
    monkeypatch.setattr(connection, "HEADER_TIMEOUT_S", 0.5)
    with _connect(served) as silent, _connect(served) as trickle:
        trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: te")
        assert _closed_by_peer(silent, 5) and _closed_by_peer(trickle, 5)
    # the deadline is for headers only: a body that takes longer is still read
    body = json.dumps(CHAT_BODY).encode()
    with _connect(served) as slow_body:
        slow_body.sendall(request_head(CHAT, content_length=len(body)))
        time.sleep(1.0)
        slow_body.sendall(body)
        status, _ = read_response(slow_body)
    assert status == 200


def test_idle_keep_alive_connection_is_closed(served, monkeypatch):
    assert served.server.config.timeout_keep_alive == connection.KEEP_ALIVE_TIMEOUT_S
    monkeypatch.setattr(served.server.config, "timeout_keep_alive", 0.5)
    body = json.dumps(CHAT_BODY).encode()
    with _connect(served) as sock:
        sock.sendall(request_head(CHAT, content_length=len(body)) + body)
        status, _ = read_response(sock)
        assert status == 200
        assert _closed_by_peer(sock, 5)


@pytest.mark.parametrize("path, body, param", [
    (CHAT, CHAT_BODY, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4}, "prompt"),
    (MESSAGES, MESSAGES_BODY, "messages")])
def test_a_prompt_far_past_the_context_is_refused_from_its_first_chunks(served, path, body, param):
    """4 MB of text against a 4,096-token window: refused after counting one chunk's tokens,
    not after encoding it all (what held every tokenizer worker for ~20 s a prompt)."""
    huge = "hello world " * 350_000
    body = copy.deepcopy(body)
    if "prompt" in body:
        body["prompt"] = huge
    else:
        body["messages"][0]["content"] = huge
    started = time.perf_counter()
    with served.http() as http:
        r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "maximum context length is 4096 tokens" in error["message"]
    assert f"in its first {prompt.COUNT_CHUNK_CHARS} characters" in error["message"]
    assert error.get("param", param) == param
    assert time.perf_counter() - started < 5
    assert not served.fake.requests


class _CountingTokenizer:
    """One token per `chars` characters; records the length of each text it encodes."""

    def __init__(self, chars: int) -> None:
        self.chars, self.encoded = chars, []

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self.encoded.append(len(text))
        return [7] * (len(text) // self.chars + add_special_tokens)


def test_only_text_far_past_the_window_is_counted_first_and_what_fits_is_encoded_whole():
    short = _CountingTokenizer(4)
    assert len(prompt.encode_fitting(short, "x" * 4000, True, 1000, "prompt")) == 1001
    assert short.encoded == [4000]                               # encoded once, whole
    sparse = _CountingTokenizer(100)                             # 100 characters a token
    text = "x" * (3 * prompt.COUNT_CHUNK_CHARS)
    assert len(prompt.encode_fitting(sparse, text, False, 10_000, "prompt")) == len(text) // 100
    assert sparse.encoded == [prompt.COUNT_CHUNK_CHARS] * 3 + [len(text)]  # counted, then whole
    dense = _CountingTokenizer(4)
    with pytest.raises(ApiError) as e:
        prompt.encode_fitting(dense, "x" * (20 * prompt.COUNT_CHUNK_CHARS), False, 100_000, "prompt")
    assert dense.encoded == [prompt.COUNT_CHUNK_CHARS] * 2             # stopped after 2 chunks
    assert "more than 131040 tokens in its first 524288 characters" in str(e.value)


def test_the_daemons_tokenizer_does_not_warn_of_a_prompt_past_the_model_length(capsys, caplog):
    """The frontend refuses such a prompt itself (a 400); transformers' warning that running it
    through the model would fail only misled whoever read the daemon's log."""
    from appliance.frontend_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_checkpoint()))
    tokenizer.encode("word " * 6000)
    logged = caplog.text + capsys.readouterr().err
    assert "sequence length is longer" not in logged


def _raw_response(served: Served, data: bytes) -> tuple[str, dict[str, str], bytes]:
    """(status line, headers, body) of what the server answers `data` with, then closes."""
    with _connect(served) as conn:
        conn.sendall(data)
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, dict(line.lower().split(": ", 1) for line in lines), body


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_a_request_that_is_not_http_gets_the_apis_error_shape(served, path):
    """QA: a malformed request got uvicorn's plain-text "Invalid HTTP request received."; now a
    400 in OpenAI's JSON shape (Anthropic's under /v1/messages), and the connection closes."""
    status, headers, body = _raw_response(served, request_head(path, content_length="abc"))
    assert status == "HTTP/1.1 400 Bad Request"
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    error = json.loads(body)
    if path == MESSAGES:
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    else:
        assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    status, _, body = _raw_response(served, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert status == "HTTP/1.1 400 Bad Request" and "error" in json.loads(body)
