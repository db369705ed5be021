"""An engine rank ends with the processes it serves: the frontend and, for ranks > 0, rank 0.

PR_SET_PDEATHSIG (Linux) has the kernel SIGKILL the rank when the thread that spawned it ends,
even under kill -9 of the frontend. A watcher thread covers the rest: a parent that died before
the call, rank 0 (a sibling, not the parent), and systems without prctl. It waits on pidfds (a
pidfd turns readable when its process ends) and polls where there are none.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_POLL_S = 0.5


def die_with(parent_pid: int, *others: int) -> None:
    """End this process as soon as `parent_pid` (our parent) or any of `others` ends."""
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent was gone before the death signal was armed
        os._exit(1)
    pids = (parent_pid, *others)
    threading.Thread(target=_watch, args=(pids,), name="lifeline", daemon=True).start()


def name_process(name: str) -> None:
    """The name `ps` and `top` show (15 bytes at most)."""
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


def _watch(pids: tuple[int, ...]) -> None:
    try:
        fds = [os.pidfd_open(pid) for pid in pids]
    except ProcessLookupError:
        _exit(pids)
    except (AttributeError, OSError):  # no pidfds (old kernel, not Linux): poll
        while all(process_alive(pid) for pid in pids) and os.getppid() == pids[0]:
            time.sleep(_POLL_S)
        _exit(pids)
    select.select(fds, [], [])
    _exit(pids)


def _exit(pids: tuple[int, ...]) -> None:
    gone = [pid for pid in pids if not process_alive(pid)]
    log.error("process %s ended; this engine rank exits with it", gone)
    logging.shutdown()
    os._exit(1)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: it has ended, though not yet been reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:  # kill(pid, 0) also finds zombies
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _prctl(option: int, arg: object) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        log.warning("prctl(%d) failed: %s", option, os.strerror(ctypes.get_errno()))
