"""One start of the engine: its private channel and its rank processes.

`EngineClient` makes a new instance for the first start and for every restart; an instance is
never reused. It says whether it has failed (`failure()`): a rank exited, rank 0 reported an
error, rank 0 stopped taking messages, or rank 0 went silent for `engine.heartbeat_timeout_s`
(its step loop publishes stats every few hundred milliseconds, also when idle, so silence means
the loop is stuck, e.g. in a collective with a hung rank).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from appliance.config import AppConfig
from appliance.engine import protocol
from appliance.engine.channel import EngineEndpoints, FrontendChannel
from appliance.engine.model_files import ModelFiles

log = logging.getLogger(__name__)

_READY_POLL_MS = 200


class EngineStartError(RuntimeError):
    """The engine could not start (a rank failed while loading, or it timed out)."""


# engine.heartbeat_timeout_s by default: one step is the longest rank 0 stays silent, and a CPU
# step with a long prefill chunk takes seconds
GPU_HEARTBEAT_TIMEOUT_S = 10.0
CPU_HEARTBEAT_TIMEOUT_S = 60.0


def heartbeat_timeout(configured: float | None, devices: tuple[str, ...]) -> float:
    """engine.heartbeat_timeout_s, or its default for ranks on these GPUs (none: the CPU)."""
    if configured is not None:
        return configured
    return GPU_HEARTBEAT_TIMEOUT_S if devices else CPU_HEARTBEAT_TIMEOUT_S


@dataclass(frozen=True)
class EngineInfo:
    max_model_len: int
    num_pages: int
    page_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    devices: tuple[str, ...] = ()  # GPU UUIDs of ranks 0..tp_size-1; () on CPU


class EngineInstance:
    def __init__(self, config: AppConfig, files: ModelFiles,
                 on_message: Callable[[protocol.FromEngine], None], timeout_s: float,
                 cancelled: threading.Event,
                 on_progress: Callable[[protocol.Progress], None] | None = None) -> None:
        """`on_progress` gets rank 0's start-up stages (called from this thread)."""
        self._on_message = on_message
        self._reported: str | None = None  # a Failed message from rank 0
        self._stopped = False
        self.procs: list[mp.process.BaseProcess] = []
        # Out of file descriptors, processes or disk: an EngineStartError, so that a restart
        # retries within engine.max_restarts (QA: a restart at the fd limit ended the daemon).
        try:
            self.channel = FrontendChannel(config.run_dir)
        except (OSError, zmq.ZMQError) as e:
            raise EngineStartError(f"cannot set up the engine channel: {e}") from None
        try:
            self.procs = _spawn_ranks(config, files, self.channel.endpoints)
            self.info = self._wait_ready(timeout_s, cancelled, on_progress)
        except (OSError, zmq.ZMQError) as e:
            self.kill()
            raise EngineStartError(f"cannot start the engine ranks: {e}") from None
        except BaseException:
            self.kill()
            raise
        self._heartbeat_timeout_s = heartbeat_timeout(config.engine.heartbeat_timeout_s,
                                                      self.info.devices)
        self._last_heard = time.monotonic()

    def send(self, message: protocol.ToEngine) -> None:
        """Queue a message for rank 0 (never blocks)."""
        self.channel.send(protocol.encode(message))

    def poll(self, timeout_ms: int) -> None:
        """Hand every message rank 0 sent within `timeout_ms` to `on_message`."""
        data = self.channel.receive(timeout_ms)
        while data is not None:
            self._last_heard = time.monotonic()
            self._handle(data)
            data = self.channel.receive(0)

    def failure(self) -> str | None:
        """Why this instance can no longer serve, or None while it can."""
        # Another rank's death first: rank 0 then fails in a collective and says so, but the
        # cause is the rank that died.
        ranks = [*enumerate(self.procs)]
        reported = f"engine rank 0 failed: {self._reported}" if self._reported else None
        cause = _first_dead(ranks[1:]) or reported or _first_dead(ranks[:1])
        if cause is not None:
            return cause
        if self.channel.send_error:
            return self.channel.send_error
        silent = time.monotonic() - self._last_heard
        if silent > self._heartbeat_timeout_s:
            return f"engine rank 0 sent nothing for {silent:.0f} s (hung)"
        return None

    def stop(self, timeout_s: float) -> None:
        """Ask rank 0 to stop (it aborts what still runs, and those outputs are delivered), wait up
        to `timeout_s`, then kill what is left."""
        if self._stopped:
            return
        self.send(protocol.ShutdownRequest())
        deadline = time.monotonic() + timeout_s
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            self.poll(100)
        for rank, proc in enumerate(self.procs):
            if proc.is_alive():
                log.warning("engine rank %d (pid %s) did not stop in %.0f s; killing it", rank,
                            proc.pid, timeout_s)
        self.kill()

    def kill(self) -> None:
        """SIGKILL every rank still running and close the channel."""
        if self._stopped:
            return
        self._stopped = True
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(10)
        if hasattr(self, "channel"):
            self.channel.close()

    def _wait_ready(self, timeout_s: float, cancelled: threading.Event,
                    on_progress: Callable[[protocol.Progress], None] | None) -> EngineInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cancelled.is_set():
                raise EngineStartError("start-up cancelled")
            data = self.channel.receive(_READY_POLL_MS)
            if data is not None:
                message = protocol.decode_from_engine(data)
                if isinstance(message, protocol.Ready):
                    return EngineInfo(message.max_model_len, message.num_pages, message.page_size,
                                      message.vocab_size, tuple(message.eos_token_ids),
                                      tuple(message.devices))
                if isinstance(message, protocol.Progress) and on_progress is not None:
                    on_progress(message)
                if isinstance(message, protocol.Failed):
                    raise EngineStartError(message.message)
            for rank, proc in enumerate(self.procs):
                if proc.exitcode is not None:
                    raise EngineStartError(f"engine rank {rank} {_describe_exit(proc.exitcode)} "
                                           "during start-up")
        raise EngineStartError(f"engine not ready after {timeout_s:.0f} s")

    def _handle(self, data: bytes) -> None:
        try:
            message = protocol.decode_from_engine(data)
        except Exception as e:  # authenticated, so a bug: say so, keep serving
            log.error("dropping a malformed message from the engine: %s", e)
            return
        if isinstance(message, protocol.Failed):
            self._reported = message.message
        else:
            self._on_message(message)


def _spawn_ranks(config: AppConfig, files: ModelFiles,
                 endpoints: EngineEndpoints) -> list[mp.process.BaseProcess]:
    """Start the ranks from this thread: they die with it (PR_SET_PDEATHSIG is per thread), so
    call it only from a thread that outlives them (the main thread or the engine monitor)."""
    ctx = mp.get_context("spawn")
    dist_port = _free_port()
    procs: list[mp.process.BaseProcess] = []
    for rank in range(config.parallel.tp_size):
        lifelines = (os.getpid(),) if rank == 0 else (os.getpid(), procs[0].pid)
        proc = ctx.Process(target=_rank_main, name=f"tokenspeed-rank{rank}", daemon=True,
                           args=(config, files, endpoints if rank == 0 else None, rank, dist_port,
                                 lifelines))
        proc.start()
        procs.append(proc)
    return procs


def _rank_main(*args) -> None:
    """A rank process's entry point. The spawn pickles its target by name: this one is
    importable without torch, so the frontend starts the ranks before it loads torch itself
    (seconds on a GPU box); appliance.engine.rank is imported in the rank."""
    from appliance.engine.rank import run_rank

    run_rank(*args)


def _first_dead(ranks: list[tuple[int, mp.process.BaseProcess]]) -> str | None:
    """How the first of `ranks` (rank, process) that exited ended, or None."""
    for rank, proc in ranks:
        if proc.exitcode is not None:
            return f"engine rank {rank} (pid {proc.pid}) {_describe_exit(proc.exitcode)}"
    return None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
