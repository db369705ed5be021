"""EngineClient's hand-off of a step's outputs from the monitor thread to the event loop: one
wake-up of the loop per engine message, every stream's tokens in order."""
from __future__ import annotations

import asyncio
import threading

from appliance.engine.client import _deliver_all, _Stream
from appliance.engine.protocol import TokenOutput


def test_a_steps_outputs_wake_the_loop_once_and_keep_each_streams_order():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        wakeups = []
        schedule = loop.call_soon_threadsafe

        def counted(callback, *args):
            wakeups.append(callback)
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counted
        streams = {rid: _Stream(loop) for rid in range(3)}
        for step in range(4):  # as the monitor thread gets Outputs messages, one a step
            _deliver_all([(streams[rid], TokenOutput(rid=rid, token_id=10 * rid + step, finish_reason=None))
                          for rid in (2, 0, 1)])

        async def drain(queue: asyncio.Queue) -> list[int]:
            return [(await queue.get()).token_id for _ in range(4)]

        assert len(wakeups) == 4
        got = {rid: asyncio.run_coroutine_threadsafe(drain(s.queue), loop).result(5)
               for rid, s in streams.items()}
        assert got == {rid: [10 * rid + step for step in range(4)] for rid in streams}
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_outputs_for_a_closed_loop_are_dropped():
    loop = asyncio.new_event_loop()
    loop.close()
    _deliver_all([(_Stream(loop), TokenOutput(rid=1, token_id=5, finish_reason=None))])  # no error
