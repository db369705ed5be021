"""The private frontend <-> engine rank 0 channel: ZeroMQ PUSH/PULL over ipc://, with CURVE.

Each engine start gets a fresh folder `<run dir>/ts-<daemon pid>-<random>/` (0700; its sockets
`in` and `out` 0600) and fresh CURVE keys, so neither a rank of another daemon nor one left over
from an earlier start can attach.

Why CURVE rather than a secret carried in each message: a PUSH socket hands messages to whichever
peers are connected, so a per-message check cannot stop a stranger that connects from being handed
requests (prompts included). The CURVE handshake refuses such a peer before any message flows: the
frontend is the CURVE server and admits (through ZAP) only the one client key it generated for
this start; rank 0 accepts only the server key it was given; traffic is encrypted. The keys reach
rank 0 through the spawn pipe, never a file. Folder and socket modes keep other users out as well.

Sends from the event loop never block: `send` queues the message; a sender thread delivers it and
records `send_error` if the engine does not take it within SEND_TIMEOUT_S.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from appliance.engine.lifeline import process_alive

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 5.0
_POLL_MS = 100
_FOLDER = re.compile(r"ts-(\d+)-[0-9a-f]+")
_MAX_IPC_PATH = 100  # sockaddr_un holds 107 bytes; "ipc://" is not part of it


class ChannelError(OSError):
    """The channel could not be set up (folder, path length, bind)."""


@dataclass(frozen=True)
class EngineEndpoints:
    """What rank 0 needs to reach the frontend (pickled into the spawn pipe, never written out)."""

    requests: str  # ipc:// address, frontend -> engine
    outputs: str  # ipc:// address, engine -> frontend
    server_key: bytes  # the frontend's CURVE public key
    public_key: bytes  # rank 0's CURVE key pair
    secret_key: bytes = field(repr=False)


class FrontendChannel:
    """The frontend's end: binds both sockets in a new private folder under `run_dir`."""

    def __init__(self, run_dir: Path) -> None:
        remove_stale_folders(run_dir)
        self.folder = _private_folder(run_dir)
        server_public, server_secret = zmq.curve_keypair()
        engine_public, engine_secret = zmq.curve_keypair()
        self.endpoints = EngineEndpoints(f"ipc://{self.folder}/in", f"ipc://{self.folder}/out",
                                         server_public, engine_public, engine_secret)
        self.send_error: str | None = None
        self._ctx = zmq.Context()
        self._auth = ThreadAuthenticator(self._ctx, log=log.getChild("zap"))
        self._closed = False
        self._outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        try:
            self._auth.start()
            self._auth.configure_curve_callback("*", _OnlyKey(engine_public))
            self._push = self._bind(zmq.PUSH, self.endpoints.requests, server_public, server_secret)
            self._pull = self._bind(zmq.PULL, self.endpoints.outputs, server_public, server_secret)
        except BaseException:
            self.close()
            raise
        self._sender = threading.Thread(target=self._send_loop, name="engine-send", daemon=True)
        self._sender.start()

    def send(self, data: bytes) -> None:
        """Queue `data` for rank 0; never blocks."""
        if not self._closed:
            self._outgoing.put(data)

    def receive(self, timeout_ms: int) -> bytes | None:
        """The next message from rank 0, or None after `timeout_ms` (one thread at a time)."""
        if self._pull.poll(timeout_ms):
            return self._pull.recv()
        return None

    def close(self, linger_s: float = 0.0) -> None:
        """Let queued sends go for up to `linger_s`, then close everything and remove the folder."""
        if self._closed:
            return
        self._closed = True
        sender = getattr(self, "_sender", None)
        if sender is not None:
            self._outgoing.put(None)
            sender.join(linger_s)
            self._stopping.set()
            sender.join()
        for name in ("_push", "_pull"):
            if hasattr(self, name) and not getattr(self, name).closed:
                getattr(self, name).close(linger=0)
        self._auth.stop()
        self._ctx.term()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _bind(self, kind: int, address: str, public: bytes, secret: bytes) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.linger = 0
        try:
            sock.bind(address)
            os.chmod(address.removeprefix("ipc://"), 0o600)
        except BaseException:
            sock.close()  # else close()'s context term() waits for it forever
            raise
        return sock

    def _send_loop(self) -> None:
        while (data := self._outgoing.get()) is not None:
            if not self._deliver(data):
                break
        self._push.close(linger=0)

    def _deliver(self, data: bytes) -> bool:
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while not self._stopping.is_set():
            try:
                self._push.send(data, zmq.NOBLOCK)
                return True
            except zmq.Again:
                if time.monotonic() > deadline:
                    self.send_error = f"engine rank 0 took no message for {SEND_TIMEOUT_S:.0f} s"
                    log.error(self.send_error)
                    return False
                self._push.poll(_POLL_MS, zmq.POLLOUT)
        return False


def connect_engine(endpoints: EngineEndpoints) -> tuple[zmq.Context, zmq.Socket, zmq.Socket]:
    """Rank 0's end: (context, inbox PULL, outbox PUSH), authenticated to the frontend."""
    ctx = zmq.Context()
    inbox = connect_socket(ctx, zmq.PULL, endpoints.requests, endpoints)
    outbox = connect_socket(ctx, zmq.PUSH, endpoints.outputs, endpoints)
    return ctx, inbox, outbox


def connect_socket(ctx: zmq.Context, kind: int, address: str, endpoints: EngineEndpoints) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.curve_serverkey = endpoints.server_key
    sock.curve_publickey = endpoints.public_key
    sock.curve_secretkey = endpoints.secret_key
    sock.connect(address)
    return sock


def remove_stale_folders(run_dir: Path) -> None:
    """Remove channel folders of daemons that are gone (never one of a live process)."""
    try:
        entries = list(run_dir.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        match = _FOLDER.fullmatch(entry.name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def check_run_dir_length(run_dir: Path, named_by: str = "server.socket") -> None:
    """ChannelError when the channel's socket paths under `run_dir` (any pid) would pass the
    ipc limit; `named_by`: the setting that chose the folder."""
    if len(f"{run_dir}/ts-{'9' * 7}-{'0' * 8}/out") > _MAX_IPC_PATH:
        raise ChannelError(f"{named_by}: its folder {run_dir} is too long a path for the engine's "
                           f"ipc sockets (at most {_MAX_IPC_PATH - 24} characters)")


def _private_folder(run_dir: Path) -> Path:
    check_run_dir_length(run_dir)
    folder = run_dir / f"ts-{os.getpid()}-{secrets.token_hex(4)}"
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # removed under a running daemon
    folder.mkdir(mode=0o700)  # fails if it exists: the name is new, nobody can have made it
    os.chmod(folder, 0o700)  # whatever the umask
    return folder


class _OnlyKey:
    """ZAP credentials provider: admit exactly one client public key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return secrets.compare_digest(key, self._key)
