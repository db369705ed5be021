"""EngineClient's hand-off of a step's outputs from the monitor thread to the event loop: one
wake-up of the loop per engine message, every stream's tokens in order, and what arrived while
the consumer was busy taken as one batch."""
from __future__ import annotations

import asyncio
import threading

import pytest

from appliance.engine.client import EngineFailed, _deliver_all, _Stream
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

        async def drain(stream: _Stream) -> list[int]:
            return [out.token_id for out in await stream.take()]  # all four: one batch

        assert len(wakeups) == 4
        got = {rid: asyncio.run_coroutine_threadsafe(drain(s), loop).result(5)
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


def test_a_batch_ends_before_an_error_which_the_next_take_raises():
    async def run() -> None:
        stream = _Stream(asyncio.get_running_loop())
        waiting = asyncio.ensure_future(stream.take())
        await asyncio.sleep(0)
        stream.push(TokenOutput(rid=1, token_id=5, finish_reason=None))
        assert [out.token_id for out in await waiting] == [5]  # a waiting consumer wakes
        stream.push(TokenOutput(rid=1, token_id=6, finish_reason=None))
        stream.push(TokenOutput(rid=1, token_id=7, finish_reason=None))
        stream.push(EngineFailed("gone"))
        stream.push(TokenOutput(rid=1, token_id=8, finish_reason=None))
        assert [out.token_id for out in await stream.take()] == [6, 7]
        with pytest.raises(EngineFailed, match="gone"):
            await stream.take()

    asyncio.run(run())
