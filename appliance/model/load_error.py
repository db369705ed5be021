"""LoadError, in a module of its own: the checkpoint readers the frontend runs before it spawns
the engine ranks (gguf_files.py, gguf_tokenizer.py) raise it without importing torch."""
from __future__ import annotations

from pathlib import Path


class LoadError(ValueError):
    """A checkpoint that does not fit the model: missing tensors, wrong shapes, bad files."""


def check_regular_file(path: Path) -> None:
    """A folder, FIFO or device where a file belongs is a LoadError: opening a FIFO would block
    start-up for ever."""
    if path.exists() and not path.is_file():
        raise LoadError(f"{path}: not a regular file")
