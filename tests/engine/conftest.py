"""An Engine (rank 0's loop) on a fake runner, with its outgoing messages captured."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from appliance.config import load_config
from appliance.engine.channel import FrontendChannel
from appliance.engine.engine import Engine
from appliance.engine.plan_arrays import PlanChannel


@pytest.fixture
def make_engine(tmp_path, monkeypatch) -> Iterator[Callable[[object], Engine]]:
    """`make_engine(runner)`: an Engine whose `sent` list holds every message it sent."""
    sent: list = []
    monkeypatch.setattr(Engine, "_send", lambda self, message: sent.append(message))
    frontend = FrontendChannel(tmp_path)
    engines: list[Engine] = []

    def make(runner) -> Engine:
        eng = Engine(load_config(None, ["device=cpu"]), runner, PlanChannel(None), frontend.endpoints)
        eng.sent = sent
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng._inbox.close(linger=0)
        eng._outbox.close(linger=0)
        eng._ctx.term()
    frontend.close()
