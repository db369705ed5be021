"""Folders generated once into the cache (the tiny checkpoint, GGUF tokenizers), safely under
concurrent starts: built in a temporary sibling, then renamed into place. A sibling a killed
build left is removed by a later one once it is STALE_TMP_S old (a live build takes seconds);
a build that cannot write (a full or read-only disk) is a CacheWriteError naming the folder."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from appliance.model.load_error import LoadError

STALE_TMP_S = 600.0


class CacheWriteError(OSError):
    """A generated folder could not be written (the cause's text included)."""


def ensure_folder(path: str | os.PathLike, files: tuple[str, ...],
                  build: Callable[[Path], None]) -> Path:
    """`path` once it holds every one of `files`; else `build(tmp)` writes them into a fresh
    temporary sibling that is renamed to `path`. A concurrent caller that renamed first wins."""
    path = Path(path)
    if all((path / f).is_file() for f in files):
        return path
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_siblings(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        build(tmp)
        try:
            os.rename(tmp, path)  # atomic; fails if another process got there first
        except OSError:
            if not all((path / f).is_file() for f in files):
                raise
    except LoadError:  # the build refused its source
        raise
    except Exception as e:  # OSError, and the writers' own (safetensors, tokenizers)
        raise CacheWriteError(f"cannot write {path}: {e}") from e
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _remove_stale_siblings(path: Path) -> None:
    """Temporary siblings of `path` that builds killed mid-way (SIGKILL skips `finally`) left."""
    for sibling in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            if time.time() - sibling.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(sibling, ignore_errors=True)
        except FileNotFoundError:  # another start removed it first
            pass
