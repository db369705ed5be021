"""`engine:` settings and the restart budget they give."""

from __future__ import annotations

import threading
import time

import pytest

from appliance.config import ConfigError, EngineConfig, load_config
from appliance.engine import client as client_module
from appliance.engine.client import EngineClient, RestartBudget
from appliance.engine.instance import EngineInfo, EngineStartError
from appliance.engine.model_files import ModelFiles


def test_engine_section_defaults_and_overrides():
    assert load_config(None).engine == EngineConfig()
    config = load_config(None, ["engine.restart=never", "engine.max_restarts=0",
                                "engine.heartbeat_timeout_s=2.5"])
    assert (config.engine.restart, config.engine.max_restarts, config.engine.heartbeat_timeout_s) == (
        "never", 0, 2.5)


@pytest.mark.parametrize("item,key", [
    ("engine.restart=always", "engine.restart"),
    ("engine.max_restarts=-1", "engine.max_restarts"),
    ("engine.max_restarts=two", "engine.max_restarts"),
    ("engine.heartbeat_timeout_s=0", "engine.heartbeat_timeout_s"),
    ("engine.restart_window_s=-5", "engine.restart_window_s"),
    ("engine.retries=3", "engine.retries"),
])
def test_bad_engine_settings_name_the_key(item, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [item])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_allows_max_restarts_per_window():
    clock = Clock()
    budget = RestartBudget(EngineConfig(max_restarts=2, restart_window_s=60), clock)
    assert budget.allow() and budget.allow()
    assert not budget.allow()
    clock.now = 61  # both restarts left the window
    assert budget.allow() and budget.allow() and not budget.allow()


def test_never_allows_no_restart():
    assert not RestartBudget(EngineConfig(restart="never")).allow()
    assert not RestartBudget(EngineConfig(max_restarts=0)).allow()


def test_the_heartbeat_timeout_defaults_by_device():
    """A CPU step with a long prefill chunk takes seconds (SmolLM2's first 2,048-token chunk
    ~5 s on 2 cores, more under load): 10 s of silence there is not a hang."""
    from appliance.engine.instance import heartbeat_timeout

    assert load_config(None).engine.heartbeat_timeout_s is None
    assert heartbeat_timeout(None, ()) == 60.0
    assert heartbeat_timeout(None, ("GPU-1",)) == 10.0
    assert heartbeat_timeout(2.5, ()) == 2.5


class _Instance:
    """An engine that starts at once and, when told, has failed."""

    info = EngineInfo(max_model_len=64, num_pages=8, page_size=16, vocab_size=100, eos_token_ids=(2,))

    def __init__(self, failed: bool) -> None:
        self.failed = failed

    def poll(self, timeout_ms: int) -> None:
        time.sleep(timeout_ms / 1e3)

    def failure(self) -> str | None:
        return "engine rank 0 exited with code 1" if self.failed else None

    def send(self, message) -> None: ...
    def stop(self, timeout_s: float) -> None: ...
    def kill(self) -> None: ...


class _FlakyClient(EngineClient):
    """Its first engine dies; the next two starts fail (a disk briefly full); the fourth runs."""

    def _start(self, on_progress=None):
        self.starts = [*getattr(self, "starts", []), time.monotonic()]
        if len(self.starts) in (2, 3):
            raise EngineStartError("cannot set up the engine channel: No space left on device")
        return _Instance(failed=len(self.starts) == 1)


def test_failed_restarts_are_spaced_out_not_spent_at_once(monkeypatch):
    monkeypatch.setattr(client_module, "RESTART_RETRY_S", 0.3)
    config = load_config(None, ["model.preset=tiny-llama", "engine.max_restarts=3"])
    client = _FlakyClient(config, ModelFiles(None, "tiny-llama", ""))
    try:
        deadline = time.monotonic() + 10
        while client.status != "ok" or len(client.starts) < 4:
            assert time.monotonic() < deadline and client.status != "failed"
            time.sleep(0.05)
        gaps = [b - a for a, b in zip(client.starts[1:], client.starts[2:])]
        assert len(client.starts) == 4 and all(gap >= 0.3 for gap in gaps)
    finally:
        client.close()


@pytest.mark.parametrize("where", ["channel", "ranks"])
def test_running_out_of_descriptors_is_a_start_error_a_restart_retries(where, monkeypatch, tmp_path):
    """QA: rank 0 killed while the frontend's descriptors were used up; the restart's os.pipe()
    raised EMFILE, which escaped as an OSError and ended the daemon at once, with restarts left.
    Out of descriptors (OSError, or zmq's own error) is now an EngineStartError: retried."""
    import errno

    import zmq

    from appliance.engine import instance as instance_module

    def out_of_fds(*args, **kwargs):
        if where == "channel":
            raise zmq.ZMQError(errno.EMFILE)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(instance_module, "FrontendChannel" if where == "channel" else "_spawn_ranks",
                        out_of_fds)
    config = load_config(None, ["model.preset=tiny-llama", f"server.socket={tmp_path}/ts.sock"])
    with pytest.raises(EngineStartError, match="Too many open files"):
        instance_module.EngineInstance(config, ModelFiles(None, "tiny-llama", ""), lambda m: None,
                                       5.0, threading.Event())
