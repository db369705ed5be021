"""Start the real daemon (`tokenspeed up` in a subprocess) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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

    def health(self) -> int | None:
        """/health's status code on the Unix socket (None: nothing answers)."""
        if not self.socket.exists():
            return None
        try:
            with self.uds_client() as http:
                return http.get("/health", timeout=5).status_code
        except httpx.HTTPError:
            return None

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_daemon(folder: Path, *overrides: str, socket: Path | None = None,
                  umask: int | None = None) -> Daemon:
    """Start `tokenspeed up` with its own port and socket (default `folder/ts-<port>.sock`);
    `umask`: the one it starts under."""
    port = free_port()
    sock = socket or folder / f"ts-{port}.sock"
    args = endpoint_args(port, sock)
    for item in overrides:
        args += ["--set", item]
    return launch_with_args(folder, port, sock, args, umask)


def endpoint_args(port: int, sock: Path) -> list[str]:
    """`--set`s for a test daemon: its own port and socket, and the fast seeded tiny model (a
    later `--set model.preset=...` or `model.path=...` overrides it)."""
    return ["--set", f"server.port={port}", "--set", f"server.socket={sock}",
            "--set", "model.preset=tiny-llama"]


def launch_with_args(folder: Path, port: int, sock: Path, args: list[str],
                     umask: int | None = None) -> Daemon:
    log = folder / f"daemon-{port}-{time.monotonic_ns()}.log"
    env = dict(os.environ)
    env.setdefault("TOKENSPEED_CACHE", str(REPO / ".cache" / "test"))
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "up", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=None if umask is None else lambda: os.umask(umask))
    return Daemon(proc, port, sock, log, args)


def wait_healthy(daemon: Daemon, timeout: float = 240) -> Daemon:
    """Wait until /health answers 200 on the Unix socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log.read_text()}")
        if daemon.health() == 200:
            return daemon
        time.sleep(0.3)
    daemon.stop()
    raise RuntimeError(f"daemon not healthy after {timeout} s:\n{daemon.log.read_text()}")


def start_daemon(folder: Path, *overrides: str, timeout: float = 240, **kwargs) -> Daemon:
    """Start `tokenspeed up` (see launch_daemon) and wait until /health answers."""
    return wait_healthy(launch_daemon(folder, *overrides, **kwargs), timeout)




def greedy_token_ids(base_url: str, prompt: list[int], max_tokens: int) -> list[int]:
    """The token ids a greedy /v1/completions gives for `prompt` (ignore_eos)."""
    with httpx.Client(base_url=base_url, timeout=300) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]


def serve_alone_and_together(folder: Path, checkpoint: str | Path, prompts: list[list[int]],
                             max_tokens: int, *overrides: str) -> tuple[list, list]:
    """Serve `checkpoint` (16-token prefill chunks): (greedy tokens of each prompt sent alone,
    of all prompts sent at once)."""
    daemon = start_daemon(folder, f"model.path={checkpoint}", "scheduler.max_batch_tokens=16",
                          *overrides)
    try:
        alone = [greedy_token_ids(daemon.base_url, p, max_tokens) for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: greedy_token_ids(daemon.base_url, p, max_tokens),
                                     prompts))
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
    return alone, together
