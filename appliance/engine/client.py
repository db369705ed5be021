"""The frontend's handle on the engine: starts the rank processes, streams tokens per request.

Sends go out on the event loop's thread; a receiver thread blocks on the engine's output socket and
hands each message to the loop. Each request gets an asyncio queue, so `generate` is a plain async
iterator and closing it early (a client that disconnected) aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import shutil
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import zmq

from appliance.config import AppConfig
from appliance.engine import protocol
from appliance.engine.model_files import ModelFiles
from appliance.engine.protocol import GenerateRequest, TokenOutput

log = logging.getLogger(__name__)


class EngineRejected(Exception):
    """The engine refused a request (bad input) or is gone; the message says why."""


class EngineStartError(RuntimeError):
    """An engine rank failed while loading the model."""


@dataclass(frozen=True)
class EngineInfo:
    max_model_len: int
    num_pages: int
    page_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class IpcPaths:
    to_engine: str
    from_engine: str

    @classmethod
    def for_config(cls, config: AppConfig) -> IpcPaths:
        folder = config.engine_ipc_dir
        return cls(f"ipc://{folder}/requests", f"ipc://{folder}/outputs")


class _Stream:
    """One request's token queue, fed from the receiver thread through the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[TokenOutput | Exception] = asyncio.Queue()

    def put(self, item: TokenOutput | Exception) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineClient:
    """Starts `tp_size` engine ranks and talks to rank 0 over ZeroMQ."""

    def __init__(self, config: AppConfig, files: ModelFiles, start_timeout_s: float = 900.0) -> None:
        self.config = config
        self.model_name = config.model.model_name
        self._paths = IpcPaths.for_config(config)
        config.engine_ipc_dir.mkdir(parents=True, exist_ok=True)
        self._ctx = zmq.Context()
        self._send = self._ctx.socket(zmq.PUSH)
        self._send.bind(self._paths.to_engine)
        self._recv = self._ctx.socket(zmq.PULL)
        self._recv.bind(self._paths.from_engine)
        self._streams: dict[int, _Stream] = {}
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._stats: dict[str, float] = {}
        self._stopping = threading.Event()
        self._closed = False
        self._procs = _spawn_ranks(config, files, self._paths)
        try:
            self.info = self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise
        self.max_model_len = self.info.max_model_len
        self._receiver = threading.Thread(target=self._receive_loop, name="engine-recv", daemon=True)
        self._receiver.start()

    # --- the API the frontend uses -------------------------------------------------------------
    def new_rid(self) -> int:
        return next(self._rids)

    @property
    def healthy(self) -> bool:
        return not self._stopping.is_set() and all(p.is_alive() for p in self._procs)

    def stats(self) -> dict[str, float]:
        values = dict(self._stats)
        values.setdefault("page_size", self.info.page_size)
        values.setdefault("pages_total", self.info.num_pages)
        return values

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        if not self.healthy:
            raise EngineRejected("the engine is not running")
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if req.rid in self._streams:
                raise EngineRejected(f"request id {req.rid} is already running")
            self._streams[req.rid] = stream
        finished = False
        try:
            self._send.send(protocol.encode(req))
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(req.rid, None)
            if not finished and not self._stopping.is_set():
                self._send.send(protocol.encode(protocol.AbortRequest(req.rid)))

    async def abort(self, rid: int) -> None:
        self._send.send(protocol.encode(protocol.AbortRequest(rid)))

    def running_rids(self) -> list[int]:
        with self._lock:
            return list(self._streams)

    # --- lifecycle -----------------------------------------------------------------------------
    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the ranks (rank 0 aborts what is still running) and remove the ipc folder."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        try:
            self._send.send(protocol.encode(protocol.ShutdownRequest()), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                log.warning("engine rank pid %s did not stop in time; terminating", proc.pid)
                proc.terminate()
                proc.join(5)
        receiver = getattr(self, "_receiver", None)
        if receiver is not None:
            receiver.join(2)
        self._fail_all(EngineRejected("the engine stopped"))
        self._send.close(linger=0)
        self._recv.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self.config.engine_ipc_dir, ignore_errors=True)

    # --- internals -----------------------------------------------------------------------------
    def _wait_ready(self, timeout_s: float) -> EngineInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._recv.poll(200):
                message = protocol.decode_from_engine(self._recv.recv())
                if isinstance(message, protocol.Ready):
                    return EngineInfo(message.max_model_len, message.num_pages, message.page_size,
                                      message.vocab_size, tuple(message.eos_token_ids))
                if isinstance(message, protocol.Failed):
                    raise EngineStartError(message.message)
            dead = [p for p in self._procs if not p.is_alive()]
            if dead:
                raise EngineStartError(f"engine rank exited with code {dead[0].exitcode} during start-up")
        raise EngineStartError(f"engine not ready after {timeout_s:.0f} s")

    def _receive_loop(self) -> None:
        while not self._stopping.is_set():
            if not self._recv.poll(100):
                if not all(p.is_alive() for p in self._procs):
                    log.error("an engine rank died; failing in-flight requests")
                    self._fail_all(EngineRejected("the engine process died"))
                    self._stopping.set()
                continue
            self._dispatch(protocol.decode_from_engine(self._recv.recv()))

    def _dispatch(self, message: protocol.FromEngine) -> None:
        if isinstance(message, protocol.Outputs):
            with self._lock:
                for item in message.items:
                    stream = self._streams.get(item.rid)
                    if stream is not None:
                        stream.put(item)
        elif isinstance(message, protocol.Rejected):
            with self._lock:
                stream = self._streams.get(message.rid)
            if stream is not None:
                stream.put(EngineRejected(message.message))
        elif isinstance(message, protocol.Stats):
            self._stats = message.values
        elif isinstance(message, protocol.Failed):
            log.error("engine failed: %s", message.message)
            self._fail_all(EngineRejected(f"engine failed: {message.message}"))

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            try:
                stream.put(error)
            except RuntimeError:  # the loop is already closed
                pass


def _spawn_ranks(config: AppConfig, files: ModelFiles, paths: IpcPaths) -> list[mp.process.BaseProcess]:
    from appliance.engine.rank import run_rank  # the rank entry point imports torch; keep it lazy

    ctx = mp.get_context("spawn")
    dist_port = _free_port()
    procs = []
    for rank in range(config.parallel.tp_size):
        proc = ctx.Process(target=run_rank, args=(config, files, paths, rank, dist_port),
                           name=f"tokenspeed-rank{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    return procs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
