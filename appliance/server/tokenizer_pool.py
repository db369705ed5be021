"""Tokenizer work (chat templating and encoding) in worker threads, off the event loop.

Each worker owns a copy of the tokenizer: a HF fast tokenizer used from two threads at once can
fail ("Already borrowed"). A long prompt holds one worker while the others serve the short
ones; at most `max_waiting` jobs wait for a worker, and a request that finds the queue full is
answered 429 at once instead of queueing behind it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from appliance.server.errors import ApiError

T = TypeVar("T")

WORKERS = 4
MAX_WAITING = 512


class TokenizerPool:
    def __init__(self, tokenizer: Any, workers: int = WORKERS, max_waiting: int = MAX_WAITING) -> None:
        self._free = [tokenizer] + [copy.deepcopy(tokenizer) for _ in range(workers - 1)]
        self._workers = anyio.CapacityLimiter(workers)
        self._capacity = workers + max_waiting
        self._admitted = 0  # running or waiting; only touched on the event loop

    async def run(self, job: Callable[[Any], T]) -> T:
        """`job(tokenizer)` in a worker thread; a 429 ApiError when the queue is full."""
        if self._admitted >= self._capacity:
            raise ApiError(429, "Too many requests are waiting for the tokenizer; retry shortly",
                           code="rate_limit_exceeded")
        self._admitted += 1
        try:
            async with self._workers:
                tokenizer = self._free.pop()
                try:
                    # not abandoned on cancel: the tokenizer goes back only once the thread is done
                    return await anyio.to_thread.run_sync(job, tokenizer)
                finally:
                    self._free.append(tokenizer)
        finally:
            self._admitted -= 1
