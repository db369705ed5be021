"""The Unix socket's file: bound private (`unix_socket`), kept while serving, removed at exit.

The CLI (`tokenspeed status`, `top`, `bench`) and local clients find the daemon by the path
`server.socket`. A file removed under a running daemon (an operator's `rm`, a cleaner of old
files) leaves its listening socket alive but out of reach: QA saw `tokenspeed status` fail
while TCP still served, and nothing in the log. `keep_socket_file` looks every CHECK_S
seconds: a missing file is bound again (mode 0600, as at start) and served beside the first
socket, with a warning; a file that is someone else's is left alone, warned of once. The files
it made are removed when it stops (the server's shutdown closes their listeners).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from pathlib import Path

import uvicorn

log = logging.getLogger(__name__)

CHECK_S = 5.0
BACKLOG = 2048


def unix_socket(path: str) -> socket.socket:
    """Bind `path` with mode 0600 (chmod before listen: nobody can connect in between)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _replace_stale(target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _replace_stale(target: Path) -> None:
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{target} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(target))
    except OSError:
        target.unlink()  # nobody listens: a stale socket left by a daemon that died
        log.info("removed stale socket %s", target)
        return
    finally:
        probe.close()
    raise OSError(f"another server is already listening on {target}")


def remove_socket_file(path: str, inode: int) -> None:
    """Remove the socket file if it is still ours (a newer daemon may have replaced it)."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # the run folder went read-only: the next start replaces a stale file
        log.warning("cannot remove the socket file %s: %s", path, e)


async def keep_socket_file(server: uvicorn.Server, path: str, inode: int) -> None:
    """Until cancelled: `path` holds our socket (inode `inode` at start), or is made again."""
    made: list[int] = []   # inodes of the files made here
    warned = False
    try:
        while True:
            await asyncio.sleep(CHECK_S)
            now = _inode(path)
            if now == inode:
                continue
            if now is not None:   # someone else's file: not ours to replace
                if not warned:
                    log.warning("the Unix socket %s was replaced by another file while serving; "
                                "the CLI and local clients cannot reach this daemon there (TCP "
                                "still serves)", path)
                    warned = True
                continue
            try:
                sock = unix_socket(path)
            except OSError as e:   # a read-only run folder, say: tried again later
                if not warned:
                    log.warning("the Unix socket %s was removed while serving and cannot be made "
                                "again (%s); TCP still serves", path, e)
                    warned = True
                continue
            inode = os.lstat(path).st_ino
            made.append(inode)
            try:
                await serve_also(server, sock)
            except AttributeError as e:   # this uvicorn's internals differ: not tried again
                log.warning("the Unix socket %s was removed while serving and cannot be served "
                            "again by this uvicorn (%s); TCP still serves", path, e)
                return
            log.warning("the Unix socket %s was removed while serving; listening on it again",
                        path)
    finally:
        for ours in made:
            remove_socket_file(path, ours)


async def serve_also(server: uvicorn.Server, sock: socket.socket) -> None:
    """Serve the app on one more listening socket, as uvicorn's startup serves each of its
    sockets (its protocol class over the same server and app state), and closed with them."""
    config = server.config

    def protocol() -> asyncio.Protocol:
        return config.http_protocol_class(config=config, server_state=server.server_state,
                                          app_state=server.lifespan.state)

    loop = asyncio.get_running_loop()
    try:
        listener = await loop.create_server(protocol, sock=sock, backlog=config.backlog)
    except BaseException:
        sock.close()
        raise
    server.servers.append(listener)


def _inode(path: str) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None
