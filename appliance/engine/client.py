"""The frontend's handle on the engine: starts and supervises the ranks, streams tokens per request.

Each request gets an asyncio queue, so `generate` is a plain async iterator, and closing it early
(a client that disconnected) aborts the request in the engine. Nothing here blocks the event loop:
sends are queued for the channel's sender thread, and one monitor thread receives rank 0's
messages and watches the ranks. When the engine fails (a rank exits, rank 0 reports an error, or
goes silent: see instance.py) the monitor fails every in-flight request with `EngineFailed`, then
restarts the engine (`engine.restart: on-failure`, at most `engine.max_restarts` times within
`engine.restart_window_s`) or gives up (`status` "failed": the daemon exits non-zero).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from appliance.config import AppConfig, ConfigError, EngineConfig
from appliance.engine import protocol
from appliance.engine.instance import EngineInfo, EngineInstance, EngineStartError
from appliance.engine.model_files import ModelFiles, resolve_model_files
from appliance.engine.protocol import GenerateRequest, TokenOutput

__all__ = ["EngineClient", "EngineFailed", "EngineInfo", "EngineRejected", "EngineStartError"]

log = logging.getLogger(__name__)

_POLL_MS = 100
STOP_TIMEOUT_S = 30.0
RESTART_RETRY_S = 2.0  # between engine starts that failed while recovering


def is_counter(key: str) -> bool:
    """An engine stats key that only grows while the engine runs (`pages_total` is the pool)."""
    return key.endswith("_total") and not key.startswith("pages_")


class EngineRejected(Exception):
    """The engine refused a request (bad input) or is not running; the message says why."""


class EngineFailed(EngineRejected):
    """The engine died or hung while the request ran; the daemon restarts it or stops."""


class RestartBudget:
    """`engine.restart` and its limit: may the engine be restarted now?"""

    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._restarts: deque[float] = deque()

    def allow(self) -> bool:
        """True (and counted) if one more restart fits the budget."""
        if self._config.restart == "never":
            return False
        now = self._clock()
        while self._restarts and now - self._restarts[0] > self._config.restart_window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self._config.max_restarts:
            return False
        self._restarts.append(now)
        return True


class _Stream:
    """One request's outputs, fed from the monitor thread through the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque[TokenOutput | Exception] = deque()
        self._arrived = asyncio.Event()

    def put(self, item: TokenOutput | Exception) -> None:
        """From any thread."""
        try:
            self.loop.call_soon_threadsafe(self.push, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def push(self, item: TokenOutput | Exception) -> None:
        """On the loop."""
        self._items.append(item)
        self._arrived.set()

    async def take(self) -> list[TokenOutput]:
        """Every output that has arrived, in order (waits for one); an error that arrived is
        raised once the outputs before it were taken."""
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        batch: list[TokenOutput] = []
        while self._items and not isinstance(self._items[0], Exception):
            batch.append(self._items.popleft())  # type: ignore[arg-type]
        if not batch:
            raise self._items.popleft()  # type: ignore[misc]
        return batch


def _files_again(config: AppConfig) -> ModelFiles:
    """The model files resolved again for a restart: those `up` makes in the cache (the tiny
    preset's checkpoint, a GGUF's tokenizer folder) are made again if something removed them
    while the engine ran; a folder damaged meanwhile fails this attempt, naming it."""
    try:
        return resolve_model_files(config)
    except ConfigError as e:
        raise EngineStartError(f"config error: {e}") from None


def _deliver_all(routed: list[tuple[_Stream, TokenOutput]]) -> None:
    """Hand a step's outputs to their streams with one wake-up of each event loop (one per
    token cost a self-pipe write and a loop wake-up each: at 256 streams, ~12K a second on an
    H200). A stream's items stay in order: a loop runs its callbacks first in, first out."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, TokenOutput]]] = {}
    for stream, item in routed:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_each, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _put_each(items: list[tuple[_Stream, TokenOutput]]) -> None:
    for stream, item in items:
        stream.push(item)


class EngineClient:
    """Starts `tp_size` engine ranks, talks to rank 0 and keeps the engine running."""

    def __init__(self, config: AppConfig, files: ModelFiles, start_timeout_s: float = 900.0,
                 on_progress: Callable[[protocol.Progress], None] | None = None) -> None:
        """`on_progress` gets the first start's stages (weights, graphs, warm-up) as they end."""
        self.config = config
        self.model_name = config.model.model_name
        self._files = files
        self._start_timeout_s = start_timeout_s
        self._streams: dict[int, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams, _status and _instance together
        self._rids = itertools.count(1)
        self._stats: dict[str, float] = {}
        self._before_restarts: dict[str, float] = {}  # counters' totals of engines that died
        self._progress: dict[int, protocol.RequestProgress] = {}
        self._status = "starting"
        self._closing = threading.Event()
        self._budget = RestartBudget(config.engine)
        self._instance = self._start(on_progress)
        self.info = self._instance.info
        self.max_model_len = self.info.max_model_len
        self._status = "ok"
        self._monitor = threading.Thread(target=self._monitor_loop, name="engine-monitor", daemon=True)
        self._monitor.start()

    # --- the API the frontend uses -------------------------------------------------------------
    def new_rid(self) -> int:
        return next(self._rids)

    @property
    def status(self) -> str:
        """"starting" | "ok" | "restarting" | "failed" (for /health and `tokenspeed status`)."""
        return self._status

    @property
    def healthy(self) -> bool:
        return self._status == "ok" and not self._closing.is_set()

    def stats(self) -> dict[str, float]:
        """The engine's latest stats; its counters (`*_total`) count on across restarts, as
        a counter of the daemon's /metrics must (a restarted engine counts from 0)."""
        values = dict(self._stats)
        for key, before in self._before_restarts.items():
            values[key] = values.get(key, 0.0) + before
        values.setdefault("page_size", self.info.page_size)
        values.setdefault("pages_total", self.info.num_pages)
        return values

    def request_progress(self) -> dict[int, protocol.RequestProgress]:
        """rid -> where the request stands in the scheduler, as of the latest stats."""
        return self._progress

    async def generate(self, req: GenerateRequest) -> AsyncIterator[list[TokenOutput]]:
        """The request's outputs in order, in batches: each is every output that had arrived
        when the consumer asked for more (one a step while it keeps up; a speculative step's
        tokens, or several steps' when it fell behind, together)."""
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if not self.healthy:
                raise EngineRejected(f"the engine is {self._not_running()}")
            if req.rid in self._streams:
                raise EngineRejected(f"request id {req.rid} is already running")
            self._streams[req.rid] = stream
            instance = self._instance
        finished = False
        try:
            instance.send(req)
            while not finished:
                try:
                    batch = await stream.take()
                except Exception:
                    finished = True  # an error ends the request: nothing to abort
                    raise
                finished = batch[-1].finish_reason is not None
                yield batch
        finally:
            with self._lock:
                self._streams.pop(req.rid, None)
            if not finished:
                await self.abort(req.rid)

    async def abort(self, rid: int) -> None:
        if self.healthy:
            self._instance.send(protocol.AbortRequest(rid))

    def running_rids(self) -> list[int]:
        with self._lock:
            return list(self._streams)

    # --- lifecycle -----------------------------------------------------------------------------
    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the ranks (rank 0 aborts what still runs) and remove the channel folder."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._monitor.join(timeout_s + 15)

    # --- the monitor thread --------------------------------------------------------------------
    def _monitor_loop(self) -> None:
        """Receive and watch; on a failure, recover. Ranks started here die with this thread
        (PR_SET_PDEATHSIG), so it also stops them itself before it ends."""
        try:
            while not self._closing.is_set() and self._status != "failed":
                self._instance.poll(_POLL_MS)
                reason = self._instance.failure()
                if reason is not None and not self._closing.is_set():
                    self._recover(reason)
        except Exception:
            log.exception("the engine monitor failed")
            self._fail_in_flight("failed")
        finally:
            self._instance.stop(STOP_TIMEOUT_S)
            self._fail_all(EngineRejected("the engine stopped"))

    def _recover(self, reason: str) -> None:
        restart = self._budget.allow()
        log.error("engine failure: %s; %s", reason, "restarting it" if restart else
                  f"not restarting (engine.restart: {self.config.engine.restart}, "
                  f"max_restarts: {self.config.engine.max_restarts})")
        self._fail_in_flight("restarting" if restart else "failed")
        self._instance.kill()
        while restart and not self._closing.is_set():
            try:
                self._files = _files_again(self.config)
                instance = self._start()
            except EngineStartError as e:
                if self._closing.is_set():   # the daemon is stopping: no failure to report
                    break
                log.error("engine restart failed: %s", e)
                restart = self._budget.allow()
                # a cause that passes (a disk briefly full) must not take every attempt at once
                self._closing.wait(RESTART_RETRY_S if restart else 0)
                continue
            with self._lock:
                self._instance, self._status = instance, "ok"
            log.info("engine restarted")
            return
        with self._lock:
            self._status = "failed"

    def _fail_in_flight(self, status: str) -> None:
        """Enter `status` and fail every request the engine had (none can slip in between)."""
        with self._lock:
            self._status = status
            streams = list(self._streams.values())
        for key, value in self._stats.items():
            if is_counter(key):
                self._before_restarts[key] = self._before_restarts.get(key, 0.0) + value
        self._stats, self._progress = {}, {}
        then = "is restarting; retry shortly" if status == "restarting" else "is not coming back"
        error = EngineFailed(f"The engine failed while running this request and {then}.")
        for stream in streams:
            stream.put(error)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.put(error)

    def _start(self, on_progress: Callable[[protocol.Progress], None] | None = None) -> EngineInstance:
        return EngineInstance(self.config, self._files, self._dispatch, self._start_timeout_s,
                              self._closing, on_progress)

    def _not_running(self) -> str:
        return "shutting down" if self._closing.is_set() else self._status

    def _dispatch(self, message: protocol.FromEngine) -> None:
        if isinstance(message, protocol.Outputs):
            with self._lock:
                routed = [(stream, item) for item in message.items
                          if (stream := self._streams.get(item.rid)) is not None]
            _deliver_all(routed)
        elif isinstance(message, protocol.Rejected):
            with self._lock:
                stream = self._streams.get(message.rid)
            if stream is not None:
                stream.put(EngineRejected(message.message))
        elif isinstance(message, protocol.Stats):
            self._stats = message.values
            self._progress = {r.rid: r for r in message.requests}
