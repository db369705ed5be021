"""`serve`: one uvicorn server for the app on TCP (`server.host:port`) and on the Unix socket.

The Unix socket is created mode 0600 (only the daemon's user may talk to it); a stale socket file
left by a crashed daemon is replaced, a live one is an error; the file is made again if it is
removed while serving, and removed at exit (socket_file.py).
SIGINT/SIGTERM/SIGHUP: stop accepting, let in-flight requests finish for up to GRACE_S seconds, then
abort the rest through the engine client (their streams end with finish_reason "abort"); a
request still running ABORT_WAIT_S later is cancelled. Returns 0, or 1 once the engine has
failed for good (`engine.restart: never`, or its restart limit spent); while the engine client
restarts a failed engine the server keeps running and /health answers 503 "restarting".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import uvicorn

from appliance.config import AppConfig
from appliance.engine.sampling_defaults import SamplingDefaults
from appliance.server.connection import uvicorn_config
from appliance.server.fd_limit import watch_fds
from appliance.server.socket_file import (BACKLOG, keep_socket_file, remove_socket_file,
                                          unix_socket)

if TYPE_CHECKING:
    from appliance.server.state import AppState, EngineClientLike

log = logging.getLogger(__name__)

GRACE_S = 10.0
ABORT_WAIT_S = 5.0
HEALTH_POLL_S = 0.5


# SIGHUP: the terminal or ssh session running `tokenspeed up` closed. No configuration is
# reloaded, so it stops the daemon as SIGTERM does (draining, logged) rather than killing it;
# unless it is ignored (`nohup tokenspeed up`), which stays so.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The STOP_SIGNALS this process is not ignoring."""
    return tuple(s for s in STOP_SIGNALS
                 if s != signal.SIGHUP or signal.getsignal(s) != signal.SIG_IGN)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose signal handling drains and returns instead of re-raising the signal."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:  # the operator's log says a stop began, and why
            log.info("shutting down (%s): draining the requests in flight",
                     signal.Signals(sig).name)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in stop_signals()}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass(frozen=True)
class Listening:
    """The daemon's bound, listening sockets: TCP and the Unix socket (its file is ours)."""

    tcp: socket.socket
    uds: socket.socket
    path: str
    inode: int

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.tcp, self.uds]

    def close(self) -> None:
        self.uds.close()
        remove_socket_file(self.path, self.inode)
        self.tcp.close()


def listen(config: AppConfig) -> Listening:
    """Bind and listen on `server.host:port` and `server.socket`; OSError names the one that
    failed."""
    try:
        tcp = tcp_socket(config.server.host, config.server.port)
    except OSError as e:
        raise OSError(f"cannot listen on {config.server.host}:{config.server.port}: {e}") from e
    try:
        uds = unix_socket(config.server.socket)
        return Listening(tcp, uds, config.server.socket, os.lstat(config.server.socket).st_ino)
    except OSError as e:
        tcp.close()
        raise OSError(f"cannot listen on {config.server.socket}: {e}") from e


def serve(config: AppConfig, client: EngineClientLike, tokenizer: Any,
          listening: Listening | None = None,
          sampling_defaults: SamplingDefaults = SamplingDefaults()) -> int:
    """Serve until SIGINT/SIGTERM (0), or until the engine fails for good (1), on `listening`
    (bound here when None: 1 if a socket can't be bound). Closes the sockets at the end."""
    if listening is None:
        try:
            listening = listen(config)
        except OSError as e:
            log.error("%s", e)
            return 1
    from appliance.server.app import build_app  # imported late: `up` starts the ranks first

    app = build_app(config, client, tokenizer, sampling_defaults)
    server = DrainingServer(uvicorn_config(app, timeout_graceful_shutdown=GRACE_S + ABORT_WAIT_S, backlog=BACKLOG))
    log.info("serving %s on http://%s:%d and %s", config.model.model_name, config.server.host,
             listening.tcp.getsockname()[1], config.server.socket)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_run(server, listening, app.state.tokenspeed))
    finally:
        listening.close()


async def _run(server: DrainingServer, listening: Listening, state: AppState) -> int:
    helpers = [asyncio.create_task(_watch_engine(server, state)),
               asyncio.create_task(_abort_after_grace(server, state)),
               asyncio.create_task(keep_socket_file(server, listening.path, listening.inode)),
               asyncio.create_task(watch_fds())]
    try:
        await server.serve(sockets=listening.sockets)
    finally:
        for task in helpers:
            task.cancel()
    await _abort_leftovers(state)
    log.info("stopped serving")
    return 1 if state.engine_status == "failed" else 0


async def _watch_engine(server: DrainingServer, state: AppState) -> None:
    """Stop serving once the engine has failed for good (a restart keeps the server up)."""
    while not server.should_exit:
        if state.engine_status == "failed":
            log.error("the engine failed and is not restarting; shutting the server down")
            server.should_exit = True
            return
        await asyncio.sleep(HEALTH_POLL_S)


async def _abort_after_grace(server: DrainingServer, state: AppState) -> None:
    """Once shutdown starts, give requests GRACE_S seconds, then abort what still runs."""
    while not server.should_exit:
        await asyncio.sleep(0.1)
    await asyncio.sleep(GRACE_S)
    rids = state.tracker.active_rids()
    if rids:
        log.warning("shutdown grace of %.0f s is over: aborting %d request(s)", GRACE_S, len(rids))
    for rid in rids:
        await state.client.abort(rid)


async def _abort_leftovers(state: AppState) -> None:
    """Requests still tracked once the server stopped (their tasks were cancelled): abort them."""
    await asyncio.sleep(0)
    for rid in state.tracker.active_rids():
        await state.client.abort(rid)
        state.tracker.finish(rid)


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


def tcp_socket(host: str, port: int) -> socket.socket:
    sock = _bound_tcp(host, port)
    try:
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _bound_tcp(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
