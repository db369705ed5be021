"""Start the real daemon (`tokenspeed up` in a subprocess) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Daemon:
    proc: subprocess.Popen
    port: int
    socket: Path
    log: Path
    args: list[str]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uds_client(self, **kwargs) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://tokenspeed", timeout=60, **kwargs)

    def cli(self, command: str, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "appliance.cli", command, *self.args, *extra],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(folder: Path, *overrides: str, timeout: float = 240) -> Daemon:
    """Start `tokenspeed up` with its own port and socket; wait until /health answers."""
    port = free_port()
    sock = folder / f"ts-{port}.sock"
    args = ["--set", f"server.port={port}", "--set", f"server.socket={sock}",
            "--set", "model.preset=tiny-llama"]  # fast; an override may name another model
    for item in overrides:
        args += ["--set", item]
    log = folder / f"daemon-{port}.log"
    env = dict(os.environ)
    env.setdefault("TOKENSPEED_CACHE", str(REPO / ".cache" / "test"))
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "up", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    daemon = Daemon(proc, port, sock, log, args)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{log.read_text()}")
        if sock.exists():
            try:
                with daemon.uds_client() as http:
                    if http.get("/health").status_code == 200:
                        return daemon
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    daemon.stop()
    raise RuntimeError(f"daemon not healthy after {timeout} s:\n{log.read_text()}")


