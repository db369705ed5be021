"""One daemon per endpoint: the pid-file lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from appliance.daemon_lock import DaemonLock, DaemonRunning, is_daemon_process, lock_holder, read_pid


def test_a_second_holder_is_refused_and_told_the_first_pid(tmp_path):
    path = tmp_path / "ts.sock.pid"
    old = os.umask(0)
    try:
        lock = DaemonLock.acquire(path)
    finally:
        os.umask(old)
    assert read_pid(path) == os.getpid() == lock_holder(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(DaemonRunning) as refused:
        DaemonLock.acquire(path)  # another open file description: flock refuses it
    assert refused.value.pid == os.getpid()
    lock.release()
    assert not path.exists() and lock_holder(path) is None
    DaemonLock.acquire(path).release()


def test_a_stale_pid_file_is_taken_over(tmp_path):
    path = tmp_path / "ts.sock.pid"
    path.write_text("999999\n")  # left by a daemon that died: nobody holds the lock
    lock = DaemonLock.acquire(path)
    assert read_pid(path) == os.getpid()
    lock.release()


def _hold_in_another_process(path) -> subprocess.Popen:
    """A process that holds the daemon lock on `path` (for 60 s), once it has taken it."""
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\nfrom appliance.daemon_lock import DaemonLock\n"
                               f"DaemonLock.acquire(__import__('pathlib').Path({str(path)!r}))\n"
                               "print('held', flush=True)\ntime.sleep(60)\n"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_lock_held_by_another_process_names_it(tmp_path):
    path = tmp_path / "ts.sock.pid"
    holder = _hold_in_another_process(path)
    try:
        with pytest.raises(DaemonRunning, match=f"pid {holder.pid}"):
            DaemonLock.acquire(path)
        assert lock_holder(path) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    DaemonLock.acquire(path).release()  # the kernel dropped the lock with the holder


def test_only_a_tokenspeed_up_process_counts_as_a_daemon():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert not is_daemon_process(sleeper.pid)
        assert not is_daemon_process(os.getpid())  # pytest
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_read_only_run_folder_at_exit_is_a_warning_not_a_traceback(tmp_path, monkeypatch, caplog):
    """QA: the run folder turned read-only (a disk remounted ro) under a running daemon; its clean
    SIGTERM drain then ended in three chained tracebacks and exit 1, from removing the socket
    file and the pid file. Each is a warning now, and the lock is still dropped."""
    from pathlib import Path

    from appliance.server import socket_file

    lock = DaemonLock.acquire(tmp_path / "ts.sock.pid")
    sock = tmp_path / "ts.sock"
    sock.write_text("")

    def read_only(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(os, "unlink", read_only)
    lock.release()
    socket_file.remove_socket_file(str(sock), sock.stat().st_ino)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cannot remove the pid file" in w for w in warnings), warnings
    assert any("cannot remove the socket file" in w for w in warnings), warnings
    monkeypatch.undo()
    assert lock_holder(tmp_path / "ts.sock.pid") is None  # the lock is free: a new start may go


def test_closed_standard_descriptors_get_dev_null(tmp_path):
    """QA: `tokenspeed up >&- 2>&-` (as some supervisors start it) gave the pid file fd 1 and the
    listening socket fd 2, which the engine ranks inherited as stderr and held open."""
    probe = ("import os\n"
             "os.close(1); os.close(2)\n"
             "from appliance.cli import _open_missing_std_fds\n"
             "_open_missing_std_fds()\n"
             "fd = os.open(os.devnull, os.O_RDONLY)\n"
             f"open({str(tmp_path / 'out')!r}, 'w').write("
             "f'{fd} {os.readlink(\"/proc/self/fd/1\")} {os.readlink(\"/proc/self/fd/2\")}')\n")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
    fd, out, err = (tmp_path / "out").read_text().split()
    assert int(fd) > 2 and out == err == os.devnull


def test_a_pid_file_that_cannot_be_written_is_named_and_not_left_behind(tmp_path):
    """`ulimit -f 0` (or a full disk): the error names the pid file, which is removed (an
    empty one was left, and the message named only the run folder)."""
    path = tmp_path / "ts.sock.pid"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
            "from appliance.daemon_lock import DaemonLock\n"
            f"DaemonLock.acquire(__import__('pathlib').Path({str(path)!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert f"cannot write the pid file {path}" in result.stderr, result.stderr
    assert not path.exists()


def test_a_removed_pid_file_is_written_again(tmp_path, caplog):
    """QA: the pid file removed under a running daemon left `tokenspeed down` unable to stop it
    (and a second `up` free to start). `keep` writes it again under a new lock; a pid file a
    second daemon took meanwhile is reported, not taken."""
    import threading
    import time
    from pathlib import Path

    path = tmp_path / "ts.sock.pid"
    lock = DaemonLock.acquire(path)
    assert lock.restore() is None
    path.unlink()
    assert "written again" in lock.restore()
    assert read_pid(path) == os.getpid() and lock_holder(path) == os.getpid()
    path.unlink()
    other = _hold_in_another_process(path)
    try:
        assert f"pid {other.pid} already holds" in lock.restore()
    finally:
        other.kill()
        other.wait()
    lock.keep(every_s=0.02)
    assert threading.active_count() >= 2
    deadline = time.monotonic() + 10

    def logged() -> bool:  # the keeper logs after it wrote the file: wait for both
        return any("written again" in r.getMessage() for r in caplog.records)

    while ((lock_holder(path), read_pid(path)) != (os.getpid(),) * 2 or not logged()) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock_holder(path) == os.getpid() and read_pid(path) == os.getpid()
    assert logged()
    lock.release()
    assert not Path(path).exists()
