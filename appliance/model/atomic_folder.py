"""Folders generated once into the cache (the tiny checkpoint, GGUF tokenizers), safely under
concurrent starts: built in a temporary sibling, then renamed into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def ensure_folder(path: str | os.PathLike, files: tuple[str, ...],
                  build: Callable[[Path], None]) -> Path:
    """`path` once it holds every one of `files`; else `build(tmp)` writes them into a fresh
    temporary sibling that is renamed to `path`. A concurrent caller that renamed first wins."""
    path = Path(path)
    if all((path / f).is_file() for f in files):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, path)  # atomic; fails if another process got there first
        except OSError:
            if not all((path / f).is_file() for f in files):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
