"""File descriptors: the daemon's limit raised at start, and a warning before it runs out.

Every client connection holds a descriptor. At the soft limit (often 1024) accept() fails and
every new connection is refused at once, with nothing in the log (QA: curl "HTTP 000", the
openai SDK "Connection error", under `ulimit -n` and idle connections); it recovers only once
descriptors are freed. `raise_fd_limit` lifts the soft limit toward the hard one at start (as
vLLM's server does; the engine ranks inherit it), and `watch_fds` warns when the open ones pass
WARN_SHARE of it, once per episode.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource

log = logging.getLogger(__name__)

TARGET = 65536        # soft limit asked for (never above the hard one)
WARN_SHARE = 0.9      # warn at this share of the soft limit ...
CLEAR_SHARE = 0.8     # ... and again only after dropping below this one
CHECK_S = 5.0


def raise_fd_limit(target: int = TARGET) -> tuple[int, int]:
    """The soft RLIMIT_NOFILE raised to min(target, hard) if below it -> (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d: %s", soft, e)
            return soft, soft
        return soft, wanted
    return soft, soft


def open_fds() -> int | None:
    """Descriptors this process has open (None where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def fd_warning(count: int, limit: int, warned: bool) -> tuple[str | None, bool]:
    """(what to log or None, whether an episode is on) for `count` of `limit` descriptors."""
    if not warned and count >= WARN_SHARE * limit:
        return (f"{count} of {limit} file descriptors open: at the limit new connections are "
                "refused (raise it with `ulimit -n`, or close idle connections)"), True
    return None, warned and count >= CLEAR_SHARE * limit


async def watch_fds() -> None:
    """Until cancelled: a warning when the open descriptors near the soft limit."""
    warned = False
    while True:
        await asyncio.sleep(CHECK_S)
        count = open_fds()
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if count is None or limit == resource.RLIM_INFINITY:
            continue
        message, warned = fd_warning(count, limit, warned)
        if message:
            log.warning("%s", message)
