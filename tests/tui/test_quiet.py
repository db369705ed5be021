"""Nothing but the dashboard draws on the terminal: `tokenspeed top` runs in a pseudo-terminal
against a /stats server and its output holds no log line (httpx logs each poll at INFO), with or
without -v; `tokenspeed status` prints its JSON alone unless -v."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from .samples import busy
from .test_top import StatsServer

REPO = Path(__file__).resolve().parents[2]
LOG_MARKS = ("HTTP Request", "INFO", "WARNING", "httpx")


def _env() -> dict[str, str]:
    return {**os.environ, "TERM": "xterm-256color", "COLUMNS": "130", "LINES": "40",
            "TOKENSPEED_CACHE": str(REPO / ".cache" / "test")}


def run_top_in_pty(socket: str, *extra: str, seconds: float = 4.0) -> tuple[int, str]:
    """Run `tokenspeed top` on a pty for `seconds`, press q; (exit code, all it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 130, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "top", "--set", f"server.socket={socket}",
                             *extra], stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=_env(),
                            start_new_session=True)
    os.close(slave)
    output = bytearray()

    def read_for(duration: float) -> None:
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    output.extend(os.read(master, 65536))
                except OSError:  # the child closed the terminal
                    return

    try:
        read_for(seconds)
        os.write(master, b"q")
        read_for(2.0)
        code = proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    return code, output.decode("utf-8", "replace")


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_only_the_dashboard_draws_on_the_terminal(tmp_path, verbose):
    socket = str(tmp_path / "ts.sock")
    server = StatsServer(socket, stats=busy())
    try:
        code, screen = run_top_in_pty(socket, *(["-v"] if verbose else []))
    finally:
        server.close()
    assert code == 0, screen[-2000:]
    assert server.hits >= 4  # it polled the whole time
    assert "llama-3.1-8b" in screen and "KV occupancy" in screen  # the dashboard drew
    assert not [mark for mark in LOG_MARKS if mark in screen], screen[-2000:]


@pytest.mark.slow
def test_status_prints_its_json_alone_unless_verbose(tmp_path):
    socket = str(tmp_path / "ts.sock")
    server = StatsServer(socket, stats=busy())
    try:
        def status(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "appliance.cli", "status", "--set",
                                   f"server.socket={socket}", *extra], capture_output=True, text=True,
                                  cwd=REPO, env=_env(), timeout=60)

        quiet, verbose = status(), status("-v")
    finally:
        server.close()
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert json.loads(quiet.stdout)["kv"]["pages_pinned"] == 100
    assert "HTTP Request: GET http://tokenspeed/stats" in verbose.stderr  # -v shows the libraries' logs
