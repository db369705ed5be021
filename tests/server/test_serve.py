"""`serve()`: TCP + Unix socket (mode 0600), stale socket handling, SIGTERM drain and grace."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from appliance.server.serve import unix_socket

from .conftest import MODEL, REPO, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uds_answers_and_is_private(served):
    mode = stat.S_IMODE(os.stat(served.socket).st_mode)
    assert mode == 0o600
    with served.uds() as http:
        assert http.get("/health").json() == {"status": "ok"}
        out = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert out.status_code == 200 and out.json()["model"] == MODEL


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path):
    path = str(Path(tempfile.mkdtemp(dir="/tmp")) / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays behind, nobody listens
    live = unix_socket(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(OSError, match="already listening"):
            unix_socket(path)
    finally:
        live.close()
        os.unlink(path)
    Path(path).write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        unix_socket(path)
    os.unlink(path)


def _start(folder: Path, grace: float, check_s: float = 5.0, fds: int | None = None
           ) -> tuple[subprocess.Popen, int, Path]:
    """The fake daemon; `check_s`: its run files' and descriptors' watch; `fds`: its open-file
    limit."""
    port, sock = _free_port(), folder / "d.sock"
    # SIGHUP as a terminal leaves it, whatever this run inherited (under nohup it is ignored)
    proc = subprocess.Popen([sys.executable, "-m", "tests.server.fake_daemon", str(port), str(sock),
                             str(grace), str(check_s)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: _child_setup(fds))
    # serving: its signal handlers are in (the socket file comes before them, and a SIGTERM
    # then ends the process by the default action: CI saw exit -15 under load)
    ok = wait_until(lambda: _answers(sock) or proc.poll() is not None, timeout=60)
    assert ok and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else "no answer"
    return proc, port, sock


def _answers(sock: Path) -> bool:
    """Any HTTP answer on the Unix socket: uvicorn is serving."""
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://ts",
                          timeout=2) as uds:
            uds.get("/health")
            return True
    except httpx.HTTPError:
        return False


def _child_setup(fds: int | None) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if fds is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def _stream_in_thread(port: int, lines: list[str]) -> threading.Thread:
    def run() -> None:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 30, "stream": True}
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
                lines.extend(line for line in r.iter_lines() if line)
        except httpx.HTTPError as e:
            lines.append(f"ERROR {e!r}")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _finish(proc: subprocess.Popen) -> tuple[int, list[int], str]:
    out, _ = proc.communicate(timeout=30)
    aborted = [line for line in out.splitlines() if line.startswith("ABORTED ")]
    return proc.returncode, json.loads(aborted[-1][8:]) if aborted else [], out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_drains_in_flight_stream_and_exits_zero(sig):
    """SIGHUP too: the terminal or ssh session that ran `tokenspeed up` closed (QA: it killed
    the daemon with no drain and no log line, its streams cut and its run files left)."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    proc, port, sock = _start(folder, grace=10.0)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://ts") as uds:
        assert uds.get("/health").status_code == 200
    lines: list[str] = []
    thread = _stream_in_thread(port, lines)
    assert wait_until(lambda: len(lines) >= 2, timeout=20)
    proc.send_signal(sig)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no new connections while draining
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    thread.join(30)
    code, aborted, out = _finish(proc)
    assert code == 0, out
    assert f"shutting down ({sig.name})" in out
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"  # ran to the end
    assert aborted == []
    assert not sock.exists()


@pytest.mark.slow
def test_sigterm_grace_expiry_aborts_in_engine():
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    proc, port, sock = _start(folder, grace=0.5)
    lines: list[str] = []
    thread = _stream_in_thread(port, lines)  # 30 tokens x 50 ms: longer than the grace
    assert wait_until(lambda: len(lines) >= 2, timeout=20)
    proc.send_signal(signal.SIGINT)
    thread.join(30)
    code, aborted, out = _finish(proc)
    assert code == 0, out
    assert aborted == [1]
    assert lines[-1] == "data: [DONE]"  # the stream ended properly, cut short by the abort
    last = json.loads(lines[-2][6:])["choices"][0]
    assert last["finish_reason"] == "abort"
    assert len(lines) < 30
    assert not sock.exists()


def test_health_says_the_engine_status_and_nothing_else(served):
    served.fake.healthy = False
    try:
        with served.http() as http:
            assert (r := http.get("/health")).status_code == 503 and r.json() == {"status": "failed"}
            served.fake.status = "restarting"
            assert (r := http.get("/health")).status_code == 503 and r.json() == {"status": "restarting"}
            assert (r := http.head("/health")).status_code == 503 and r.content == b""
    finally:
        served.fake.healthy = True
        vars(served.fake).pop("status", None)
    with served.http() as http:  # load balancers probe with HEAD too
        assert (r := http.head("/health")).status_code == 200 and r.content == b""
        assert http.head("/metrics").status_code == 200


@pytest.mark.anyio
async def test_watchdog_stops_the_server_once_the_engine_failed_for_good():
    import asyncio
    from types import SimpleNamespace

    from appliance.server.serve import _watch_engine

    server = SimpleNamespace(should_exit=False)
    with pytest.raises(TimeoutError):  # a restart keeps the server up
        await asyncio.wait_for(_watch_engine(server, SimpleNamespace(engine_status="restarting")), 0.3)
    assert server.should_exit is False
    await _watch_engine(server, SimpleNamespace(engine_status="failed"))
    assert server.should_exit is True


def test_an_ignored_sighup_stays_ignored():
    """`nohup tokenspeed up &` must outlive its terminal."""
    from appliance.server.serve import stop_signals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert signal.SIGHUP not in stop_signals()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert signal.SIGHUP in stop_signals()
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_socket_file_removed_while_serving_is_made_again():
    """QA: the socket file removed under a running daemon left `tokenspeed status` failing
    while TCP served, and nothing in the log. It is bound again (0600) and answers; a file
    that is someone else's is left alone and warned of; at exit the daemon removes only its
    own."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    proc, port, sock = _start(folder, grace=1.0, check_s=0.1)
    first = sock.stat().st_ino
    sock.unlink()
    assert wait_until(sock.exists, timeout=10), "the socket file was not made again"
    assert sock.stat().st_ino != first and stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://ts") as uds:
        assert uds.get("/health").status_code == 200
    sock.unlink()
    sock.write_text("someone else's")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code, _, out = _finish(proc)
    assert code == 0, out
    assert out.count("was removed while serving; listening on it again") == 1, out
    assert out.count("was replaced by another file while serving") == 1, out
    assert sock.read_text() == "someone else's"


def test_a_warning_before_the_open_files_run_out():
    """QA: at the open-file limit every new connection failed at once and the log said nothing.
    Idle connections up to 90% of a 96-descriptor limit: the daemon warns (once)."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    proc, port, sock = _start(folder, grace=1.0, check_s=0.1, fds=96)
    held = []
    try:
        for _ in range(80):
            held.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(1.0)
    finally:
        for conn in held:
            conn.close()
    proc.send_signal(signal.SIGTERM)
    code, _, out = _finish(proc)
    assert code == 0, out
    assert out.count("file descriptors open: at the limit new connections are refused") == 1, out
