"""One daemon per endpoint: `tokenspeed up` holds an exclusive flock on its pid file.

The lock is taken before anything is loaded, so a second `up` with the same config (the same
socket, hence the same pid file) fails at once and names the holder. The kernel drops the lock
when the daemon dies (even under kill -9), so a stale pid file never blocks a new daemon.
`tokenspeed down` signals a pid only if that pid holds the lock and is a `tokenspeed up` process.

A pid file removed under a running daemon (an operator's `rm`, a cleaner of old files) left
`tokenspeed down` saying "no daemon running", and a second `up` free to start beside it (QA).
`keep` writes it again, within CHECK_S seconds, under a new lock; if another daemon took the
path meanwhile, it says so.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

CHECK_S = 5.0


class DaemonRunning(RuntimeError):
    """Another live daemon holds the lock."""

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"{holder} already holds {path}")
        self.pid = pid


class DaemonLock:
    """An exclusive, non-blocking flock on the pid file, which then holds our pid (mode 0600)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    @classmethod
    def acquire(cls, path: Path) -> DaemonLock:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DaemonRunning(path, lock_holder(path) or read_pid(path)) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # the previous holder removed the file after we opened it: retry
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:  # a full disk, `ulimit -f 0`: no empty pid file is left behind
            path.unlink(missing_ok=True)
            os.close(fd)
            raise OSError(e.errno, f"cannot write the pid file {path}: {e.strerror}") from None
        return cls(path, fd)

    def restore(self) -> str | None:
        """The pid file written again under a new lock if it is no longer ours -> what happened,
        for the log (None: it is ours)."""
        if self._fd < 0 or _same_file(self._fd, self.path):
            return None
        try:
            fresh = DaemonLock.acquire(self.path)
        except DaemonRunning as e:
            return f"the pid file {self.path} was replaced: {e}"
        except OSError as e:
            return f"the pid file {self.path} was removed and cannot be written again: {e}"
        os.close(self._fd)
        self._fd, fresh._fd = fresh._fd, -1
        return f"the pid file {self.path} was removed while the daemon ran; written again"

    def keep(self, every_s: float = CHECK_S) -> None:
        """`restore` every `every_s` seconds in a thread, until `release`; each change logged
        once."""
        def run() -> None:
            said = None
            while not self._stop.wait(every_s):
                what = self.restore()
                if what is not None and what != said:
                    log.warning("%s", what)
                said = what

        self._keeper = threading.Thread(target=run, name="pid-file", daemon=True)
        self._keeper.start()

    def release(self) -> None:
        """Stop keeping the pid file, remove it (while still holding the lock), then drop the
        lock."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
        if self._fd < 0:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError as e:  # a read-only run folder: the next start sees the pid file is stale
            log.warning("cannot remove the pid file %s: %s", self.path, e)
        os.close(self._fd)
        self._fd = -1


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def lock_holder(path: Path) -> int | None:
    """The pid holding a flock on `path`, from /proc/locks (None: nobody, or not Linux)."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters are marked "->"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4])
    return None


def is_daemon_process(pid: int) -> bool:
    """Whether `pid` runs `tokenspeed up` (or `python -m appliance.cli up`)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    named = any(Path(a).name == "tokenspeed" or a == "appliance.cli" for a in args)
    return named and "up" in args


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.stat(path, follow_symlinks=False), os.fstat(fd)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    except FileNotFoundError:
        return False
