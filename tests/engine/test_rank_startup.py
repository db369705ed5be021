"""An engine rank's start-up: the GIL handed between its threads quickly while they all run
Python (appliance/engine/rank.py, quick_gil_handoffs); and its failure when another rank
died (`lost_peer`: one log line, not a traceback)."""
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


def _collective_after_peer_exit(rank: int, port: int, queue) -> None:
    import os

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    t = torch.ones(4)
    dist.all_reduce(t)
    if rank == 1:
        os._exit(0)   # as a SIGKILLed rank: no goodbye
    try:
        dist.all_reduce(t)
        queue.put(None)
    except Exception as e:  # noqa: BLE001 - what the surviving rank sees
        queue.put(e)


def test_a_collective_after_a_rank_died_is_told_from_other_failures():
    """QA: a TP=2 rank SIGKILLed on the CPU left ~50 lines of gloo traceback in the survivor's
    log before the client's one-line cause. The survivor logs one line for it now: `lost_peer`
    knows the failure gloo really raises (this torch's), and nothing else."""
    import multiprocessing
    import socket

    from appliance.engine.rank import lost_peer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_collective_after_peer_exit, args=(r, port, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    error = queue.get(timeout=60)
    for p in procs:
        p.join(30)
    assert error is not None and lost_peer(error), repr(error)
    assert not lost_peer(RuntimeError("CUDA out of memory")) and not lost_peer(ValueError("x"))
