"""Faults against the real daemon: dead and hung engine ranks, a killed frontend, two daemons on
one endpoint, a stranger on the engine channel, private files, and start-up refusals."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import zmq
from daemon_process import (REPO, endpoint_args, free_port, launch_daemon, launch_with_args,
                            start_daemon, wait_healthy)
from faults import (InFlightRequest, Tally, engine_ranks, fault_round, finish, inject, probe,
                    start_requests, wait_status)

from appliance.engine import protocol
from appliance.engine.lifeline import process_alive

pytestmark = pytest.mark.slow


@pytest.fixture
def folder() -> Path:
    """A short folder under /tmp (Unix socket paths are limited to 107 bytes)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="tsf-", dir="/tmp"))


def _stop(daemon) -> None:
    code = daemon.stop()
    assert code == 0, daemon.log.read_text()


def _generated_total(daemon) -> float:
    """/metrics' generation_tokens_total once the engine has published its latest counters."""
    time.sleep(0.6)  # the engine publishes its stats every 0.25 s
    text = httpx.get(daemon.base_url + "/metrics", timeout=30).text
    line = next(x for x in text.splitlines() if x.startswith("tokenspeed_generation_tokens_total "))
    return float(line.split()[1])


def test_killed_rank_fails_every_request_then_the_engine_restarts(folder):
    """... and /metrics' counters count on from the dead engine's totals."""
    daemon = start_daemon(folder)
    tally = Tally()
    try:
        assert probe(daemon) == "length"
        before = _generated_total(daemon)
        outcomes = fault_round(daemon, tally, rank=0, streams=5)
        assert _generated_total(daemon) >= before + 8  # fault_round's probe after the restart
        assert any(o.kind == "error" for o in outcomes), outcomes
        _assert_all_told(tally)
        log = daemon.log.read_text()
        assert "was killed by SIGKILL; restarting it" in log and "engine restarted" in log
        status = json.loads(daemon.cli("status").stdout)
        assert status["engine"] == "ok" and status["health"] is True
        print(f"tp1, kill -9 rank 0: {tally.line()}")
    finally:
        _stop(daemon)


def test_tp2_dead_or_hung_ranks_fail_every_request_then_the_engine_restarts(folder):
    daemon = start_daemon(folder, "parallel.tp_size=2", "engine.heartbeat_timeout_s=3")
    tally = Tally()
    try:
        fault_round(daemon, tally, rank=1, streams=5)
        # the rank that died is named, not rank 0's failed collective that followed
        assert "engine rank 1 (pid" in daemon.log.read_text().split("engine failure: ", 1)[1]
        fault_round(daemon, tally, rank=0, streams=5)
        # A stopped rank 1 leaves rank 0 waiting in a collective: only the heartbeat shows it.
        ranks = engine_ranks(daemon.proc.pid)
        fault_round(daemon, tally, rank=1, streams=3, sig=signal.SIGSTOP)
        assert "sent nothing for" in daemon.log.read_text()
        assert not any(process_alive(pid) for pid in ranks.values())
        _assert_all_told(tally)
        assert tally.faults == 3 and tally.told_error >= 3
        print(f"tp2, kill -9 rank 1, rank 0, SIGSTOP rank 1: {tally.line()}")
    finally:
        _stop(daemon)


def _assert_all_told(tally: Tally) -> None:
    assert tally.lost == 0, tally.details
    assert tally.worst_error_s < 10, tally.line()
    assert tally.pages_leaked == 0


def test_restart_never_exits_nonzero_and_tells_every_client(folder):
    daemon = start_daemon(folder, "engine.restart=never")
    requests = start_requests(daemon, 3)
    _, fault_at = inject(daemon, 0)
    tally = Tally()
    tally.add(finish(requests), fault_at)
    assert daemon.proc.wait(30) != 0
    assert tally.lost == 0 and tally.told_error >= 1, tally.details
    assert "not restarting" in daemon.log.read_text()
    assert not daemon.socket.exists()


def test_a_restart_makes_the_cached_model_again_if_it_was_removed(folder, monkeypatch):
    """The tiny preset's checkpoint is made in the cache at start-up; a cache cleaned while
    the daemon runs, then a rank's death: the restart makes it again (it failed three times
    on the missing config.json, and the daemon shut down)."""
    import shutil

    monkeypatch.setenv("TOKENSPEED_CACHE", str(folder / "cache"))
    daemon = start_daemon(folder)
    try:
        shutil.rmtree(folder / "cache" / "models")
        inject(daemon, 0)
        deadline = time.monotonic() + 120
        while "engine restarted" not in daemon.log.read_text() and daemon.proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert wait_status(daemon, 200) and probe(daemon) == "length", daemon.log.read_text()
    finally:
        _stop(daemon)


def test_sigterm_while_the_engine_restarts_stops_cleanly_without_an_error(folder):
    """A stop that lands while a dead rank's replacement loads cancels the start-up: exit 0,
    and no "engine restart failed" in the log (there was no failure to report)."""
    daemon = start_daemon(folder)
    inject(daemon, 0)
    deadline = time.monotonic() + 60
    while "restarting it" not in daemon.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    code = daemon.stop()
    log = daemon.log.read_text()
    assert code == 0 and "restarting it" in log, log
    assert "engine restart failed" not in log, log


def test_sigterm_to_the_whole_group_drains_and_logs_no_engine_failure(folder):
    """systemd's default stop (and `timeout`) signal every process of the group: the ranks
    leave the stop to the frontend, which drains the request in flight and says so; a rank
    dead of the signal was logged as an engine failure and a restart attempt."""
    daemon = start_daemon(folder)
    request = InFlightRequest(daemon.base_url, "chat", 0, max_tokens=64)  # within the grace
    request.start()
    assert request.started.wait(30)
    os.killpg(daemon.proc.pid, signal.SIGTERM)
    outcomes = finish([request])
    assert daemon.proc.wait(60) == 0
    log = daemon.log.read_text()
    assert [o.kind for o in outcomes] == ["finished"], (outcomes, log)
    assert "shutting down (SIGTERM)" in log and "stopped serving" in log
    assert "engine failure" not in log and "restart" not in log, log


def test_down_right_after_a_rank_died_stops_the_daemon_promptly(folder):
    """The event loop never waits on a dead engine: `down` during the restart works at once."""
    daemon = start_daemon(folder)
    requests = start_requests(daemon, 3)
    _, fault_at = inject(daemon, 0)
    started = time.monotonic()
    down = daemon.cli("down")
    assert down.returncode == 0, down.stderr
    assert time.monotonic() - started < 20
    assert daemon.proc.wait(5) == 0
    tally = Tally()
    tally.add(finish(requests), fault_at)
    assert tally.lost == 0, tally.details
    assert not engine_ranks(daemon.proc.pid) and not list(folder.glob("ts-*-*"))


def test_killing_the_frontend_leaves_no_rank(folder):
    daemon = start_daemon(folder, "parallel.tp_size=2")
    ranks = engine_ranks(daemon.proc.pid)
    assert sorted(ranks) == [0, 1]
    daemon.proc.kill()
    daemon.proc.wait(10)
    deadline = time.monotonic() + 5
    while any(process_alive(pid) for pid in ranks.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in ranks.values() if process_alive(pid)]
    # The next daemon on the same endpoints starts (the lock died with the frontend).
    second = wait_healthy(launch_with_args(folder, daemon.port, daemon.socket, daemon.args))
    _stop(second)


def test_two_ups_at_once_exactly_one_serves(folder):
    port = free_port()
    sock = folder / "ts.sock"
    args = endpoint_args(port, sock)
    first, second = (launch_with_args(folder, port, sock, args) for _ in range(2))
    started = time.monotonic()
    deadline = started + 30
    while first.proc.poll() is None and second.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    loser, winner = (first, second) if first.proc.poll() is not None else (second, first)
    assert loser.proc.returncode == 1
    assert time.monotonic() - started < 15  # it did not load a model first
    assert f"a daemon (pid {winner.proc.pid}) already runs" in loser.log.read_text()
    wait_healthy(winner)
    channel_folders = list(folder.glob("ts-*-*"))
    assert [p.name.split("-")[1] for p in channel_folders] == [str(winner.proc.pid)]
    assert (folder / "ts.sock.pid").read_text().strip() == str(winner.proc.pid)
    assert probe(winner) == "length"
    # A third, once the winner serves, is refused the same way and touches nothing.
    third = launch_with_args(folder, port, sock, args)
    assert third.proc.wait(30) == 1
    assert list(folder.glob("ts-*-*")) == channel_folders and winner.health() == 200
    _stop(winner)


def test_private_channel_files_and_a_stranger_on_the_engine_sockets(folder):
    """Under umask 000 the run files are still private; a process that reaches the engine's
    sockets anyway (same user) is handed no request and cannot inject outputs."""
    run = folder / "run"
    daemon = start_daemon(folder, socket=run / "ts.sock", umask=0)
    try:
        (channel,) = run.glob("ts-*-*")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode)
                 for p in (run, channel, channel / "in", channel / "out", run / "ts.sock",
                           run / "ts.sock.pid")}
        assert modes == {"run": 0o700, channel.name: 0o700, "in": 0o600, "out": 0o600,
                         "ts.sock": 0o600, "ts.sock.pid": 0o600}
        expected = _greedy(daemon)
        ctx = zmq.Context()
        eavesdropper = ctx.socket(zmq.PULL)  # would be handed requests by the frontend's PUSH
        eavesdropper.connect(f"ipc://{channel}/in")
        injector = ctx.socket(zmq.PUSH)  # would feed the frontend forged outputs
        injector.connect(f"ipc://{channel}/out")
        forged = protocol.encode(protocol.Outputs(
            [protocol.TokenOutput(rid, 42, "stop") for rid in range(1, 200)]))
        for _ in range(20):
            try:
                injector.send(forged, zmq.NOBLOCK)
            except zmq.Again:
                pass
        got = [_greedy(daemon) for _ in range(3)]
        stolen = eavesdropper.poll(1000)
        ctx.destroy(linger=0)
        assert got == [expected] * 3
        assert not stolen
        assert daemon.health() == 200
    finally:
        _stop(daemon)


def _greedy(daemon) -> str:
    body = {"model": "tiny-llama", "prompt": "The stranger said", "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    response = httpx.post(daemon.base_url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_down_refuses_a_pid_file_that_names_a_foreign_process(folder):
    sock = folder / "ts.sock"
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        (folder / "ts.sock.pid").write_text(str(stranger.pid))
        args = ["--set", f"server.socket={sock}"]
        down = subprocess.run([sys.executable, "-m", "appliance.cli", "down", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 1 and "no daemon running" in down.stderr
        # Even with the file locked by a process that is not a tokenspeed daemon.
        import fcntl

        with open(folder / "ts.sock.pid") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            down = subprocess.run([sys.executable, "-m", "appliance.cli", "down", *args], cwd=REPO,
                                  capture_output=True, text=True, timeout=60)
        assert down.returncode == 1 and "not signalling" in down.stderr
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_kv_pool_smaller_than_one_request_is_refused_at_start(folder):
    daemon = launch_daemon(folder, "kv.num_pages=4", "model.max_model_len=4096")
    assert daemon.proc.wait(120) == 1
    log = daemon.log.read_text()
    assert "the KV pool holds 64 tokens" in log and "max_model_len 4096" in log
    assert "kv.num_pages" in log and "Traceback" not in log


def test_kv_pool_larger_than_memory_is_refused_naming_the_key(folder):
    """It passed validation and failed in the allocator with a 22-line traceback."""
    daemon = launch_daemon(folder, "kv.num_pages=2147483647")
    assert daemon.proc.wait(120) == 1
    log = daemon.log.read_text()
    assert "kv.num_pages: 2147483647 pages of" in log and "more than the" in log
    assert "Traceback" not in log


def test_garbled_config_json_is_a_clear_start_up_error(folder):
    checkpoint = folder / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    daemon = launch_daemon(folder, f"model.path={checkpoint}")
    assert daemon.proc.wait(60) == 2
    log = daemon.log.read_text()
    assert f"{checkpoint / 'config.json'}: not valid JSON" in log and "Traceback" not in log
    assert not list(folder.glob("ts-*-*")) and not (folder / f"ts-{daemon.port}.sock.pid").exists()
