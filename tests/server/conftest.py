"""Fixtures: the tiny model's tokenizer, a fake engine, and the app served by uvicorn in a thread
on a free TCP port and a Unix socket (the same socket helpers and uvicorn config `serve` uses)."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from appliance.config import AppConfig, ModelConfig, ServerConfig
from appliance.engine.sampling_defaults import SamplingDefaults
from appliance.server.app import build_app
from appliance.server.connection import uvicorn_config
from appliance.server.serve import tcp_socket, unix_socket

from .fake_engine import FakeEngineClient

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint())


def tiny_checkpoint() -> Path:
    """The tiny model's folder (shared with the e2e tests); built once (it needs torch)."""
    folder = REPO / ".cache" / "test" / "models" / "tiny-llama"
    if not (folder / "tokenizer_config.json").is_file():  # the folder appears complete or not at all
        from appliance.model.tiny import ensure_tiny_checkpoint

        ensure_tiny_checkpoint(folder)
    return folder


@dataclass
class Served:
    config: AppConfig
    fake: FakeEngineClient
    port: int
    socket: Path
    server: uvicorn.Server

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, **kwargs)

    def uds(self, **kwargs) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://tokenspeed", timeout=30, **kwargs)


def make_config(socket: Path, max_model_len: int = 4096, **server: Any) -> AppConfig:
    """The test config; `server` sets ServerConfig keys (api_key, max_body_bytes)."""
    return AppConfig(model=ModelConfig(preset=MODEL, max_model_len=max_model_len),
                     server=ServerConfig(host="127.0.0.1", port=0, socket=str(socket), **server))


@contextmanager
def serve_in_thread(tokenizer, engine: Callable[[AppConfig], Any] | None = None,
                    sampling_defaults: SamplingDefaults = SamplingDefaults(), **server: Any) -> Iterator[Served]:
    """The app on a fake engine, or on `engine(config)` (e.g. a real EngineClient; then
    `Served.fake` is that client)."""
    folder = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))  # short path: AF_UNIX limit
    config = make_config(folder / "ts.sock", **server)
    fake = FakeEngineClient(tokenizer) if engine is None else engine(config)
    app = build_app(config, fake, tokenizer, sampling_defaults)
    tcp, uds = tcp_socket("127.0.0.1", 0), unix_socket(config.server.socket)
    server = uvicorn.Server(uvicorn_config(app, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [tcp, uds]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield Served(config, fake, tcp.getsockname()[1], Path(config.server.socket), server)
    finally:
        server.should_exit = True
        thread.join(10)
        Path(config.server.socket).unlink(missing_ok=True)
        folder.rmdir()


@pytest.fixture(scope="session")
def _served(tokenizer) -> Iterator[Served]:
    with serve_in_thread(tokenizer) as served:
        yield served


@pytest.fixture()
def served(_served: Served) -> Served:
    """The shared server with its fake engine reset to defaults."""
    _served.fake.reset()
    return _served


@pytest.fixture(scope="session")
def served_with_key(tokenizer) -> Iterator[Served]:
    with serve_in_thread(tokenizer, api_key="sekrit") as served:
        yield served


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()

