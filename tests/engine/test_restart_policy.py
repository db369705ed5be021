"""`engine:` settings and the restart budget they give."""

from __future__ import annotations

import pytest

from appliance.config import ConfigError, EngineConfig, load_config
from appliance.engine.client import RestartBudget


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
