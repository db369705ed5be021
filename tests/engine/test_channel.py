"""The private engine channel: CURVE-authenticated, private files, sends that never block."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq

from appliance.engine import channel as channel_module
from appliance.engine.channel import FrontendChannel, connect_engine, remove_stale_folders


@pytest.fixture
def run_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tsc-", dir="/tmp"))  # short: ipc paths are limited


def test_rank_0_talks_both_ways_and_the_files_are_private(run_dir):
    old = os.umask(0)
    try:
        channel = FrontendChannel(run_dir)
    finally:
        os.umask(old)
    ctx, inbox, outbox = connect_engine(channel.endpoints)
    try:
        channel.send(b"request")
        assert inbox.poll(5000) and inbox.recv() == b"request"
        outbox.send(b"output")
        assert channel.receive(5000) == b"output"
        folder = channel.folder
        assert folder.parent == run_dir and folder.name.startswith(f"ts-{os.getpid()}-")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert {stat.S_IMODE((folder / n).stat().st_mode) for n in ("in", "out")} == {0o600}
    finally:
        ctx.destroy(linger=0)
        channel.close()
    assert not folder.exists()


def test_strangers_are_handed_no_request_and_cannot_send_outputs(run_dir):
    channel = FrontendChannel(run_dir)
    ctx = zmq.Context()
    try:
        plain = ctx.socket(zmq.PULL)  # no security at all
        plain.connect(channel.endpoints.requests)
        wrong_key = ctx.socket(zmq.PULL)  # knows the server's public key, but not rank 0's keys
        public, secret = zmq.curve_keypair()
        wrong_key.curve_serverkey, wrong_key.curve_publickey, wrong_key.curve_secretkey = (
            channel.endpoints.server_key, public, secret)
        wrong_key.connect(channel.endpoints.requests)
        forger = ctx.socket(zmq.PUSH)
        forger.curve_serverkey, forger.curve_publickey, forger.curve_secretkey = (
            channel.endpoints.server_key, public, secret)
        forger.connect(channel.endpoints.outputs)
        forger.send(b"forged")
        time.sleep(0.5)  # let every handshake run (and fail)
        _, inbox, _ = rank = connect_engine(channel.endpoints)
        for i in range(10):
            channel.send(b"request %d" % i)
        got = []
        while len(got) < 10 and inbox.poll(5000):
            got.append(inbox.recv())
        assert got == [b"request %d" % i for i in range(10)]  # all of them reached rank 0
        assert not plain.poll(300) and not wrong_key.poll(300)
        assert channel.receive(300) is None
        rank[0].destroy(linger=0)
    finally:
        ctx.destroy(linger=0)
        channel.close()


def test_send_never_blocks_and_a_peer_that_takes_nothing_is_reported(run_dir, monkeypatch):
    monkeypatch.setattr(channel_module, "SEND_TIMEOUT_S", 0.3)
    channel = FrontendChannel(run_dir)  # nobody connected: a PUSH has nowhere to send
    try:
        started = time.monotonic()
        for _ in range(100):
            channel.send(b"x" * 1000)
        assert time.monotonic() - started < 0.1
        deadline = time.monotonic() + 5
        while channel.send_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "took no message" in (channel.send_error or "")
    finally:
        channel.close()


def test_stale_folders_of_dead_daemons_go_and_live_ones_stay(run_dir):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        names = [f"ts-{dead.pid}-ab12", f"ts-{live.pid}-ab12", f"ts-{os.getpid()}-ab12", "other"]
        for name in names:
            (run_dir / name).mkdir()
        remove_stale_folders(run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(names[1:])
    finally:
        live.kill()
        live.wait()


def test_a_too_long_run_folder_is_a_clear_error():
    long_dir = Path("/tmp") / ("x" * 90)
    with pytest.raises(channel_module.ChannelError, match="server.socket"):
        FrontendChannel(long_dir)


def test_a_socket_that_fails_to_bind_is_an_error_not_a_hang(run_dir, monkeypatch):
    """A bind (or its chmod) failing left the socket open, and close()'s context term()
    then waited for it forever: start-up hung in "warming up" with nothing in the log."""
    chmod = os.chmod

    def no_space_for_outputs(path, mode):
        if str(path).endswith("/out"):
            raise OSError(28, "No space left on device")
        chmod(path, mode)

    monkeypatch.setattr(channel_module.os, "chmod", no_space_for_outputs)
    outcome: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(lambda: FrontendChannel(run_dir), outcome), daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "FrontendChannel hung after a failed bind"
    assert isinstance(outcome[0], OSError) and "No space" in str(outcome[0])
    assert list(run_dir.iterdir()) == []  # its folder removed


def _catch(make, outcome: list[BaseException]) -> None:
    try:
        make()
    except BaseException as e:
        outcome.append(e)


def test_a_run_folder_removed_under_the_daemon_is_made_again(run_dir):
    """An engine restart after the run folder was deleted (a cache cleaned by hand) failed
    every attempt at once: the channel's folder could not be made in it."""
    gone = run_dir / "run"
    channel = FrontendChannel(gone)
    try:
        assert stat.S_IMODE(gone.stat().st_mode) == 0o700 and channel.folder.parent == gone
    finally:
        channel.close()


def test_a_too_long_cache_folder_is_named_before_anything_loads(monkeypatch, capsys):
    """The run folder under TOKENSPEED_CACHE was found too long only once the model files were
    made, and the error named server.socket, which the user never set."""
    from appliance import cli

    cache = Path("/tmp") / ("c" * 80)
    monkeypatch.setenv("TOKENSPEED_CACHE", str(cache))
    config = cli.load_config(None, ["model.preset=tiny-llama"])
    assert cli._serve_when_ready(config, listening=None) == 2
    err = capsys.readouterr().err
    assert f"config error: TOKENSPEED_CACHE: its folder {cache}/run is too long" in err
    assert not cache.exists()  # nothing made before the check
