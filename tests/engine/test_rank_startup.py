"""An engine rank's start-up: the GIL handed between its threads quickly while they all run
Python (appliance/engine/rank.py, quick_gil_handoffs)."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from appliance.engine.rank import STARTUP_SWITCH_INTERVAL_S, quick_gil_handoffs


def test_the_switch_interval_is_short_inside_and_restored_after():
    before = sys.getswitchinterval()
    with quick_gil_handoffs():
        assert sys.getswitchinterval() == pytest.approx(STARTUP_SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), quick_gil_handoffs(1e-3):
        raise RuntimeError("a failed start")
    assert sys.getswitchinterval() == before


def test_a_thread_of_short_c_calls_gets_the_gil_back_quickly_beside_a_busy_one():
    """300 short sleeps (each releases the GIL) beside a pure-Python thread: at the default
    5 ms each waits for the busy thread's interval (~1.6 s here); inside the block ~0.15 s."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    def calls() -> float:
        started = time.perf_counter()
        for _ in range(300):
            time.sleep(0)
        return time.perf_counter() - started

    busy = threading.Thread(target=spin)
    busy.start()
    try:
        slow = calls()
        with quick_gil_handoffs():
            quick = calls()
    finally:
        stop.set()
        busy.join()
    assert quick * 3 < slow
