"""A GGUF file's tokenizer and chat template as an HF tokenizer folder.

transformers converts the `tokenizer.ggml.*` metadata into a fast tokenizer
(`AutoTokenizer.from_pretrained(folder, gguf_file=name)`, which keeps
`tokenizer.chat_template`); that takes seconds, so the result is saved once into a cache
folder named after the file's path, size and modification time, and every later start
(and the frontend, which loads tokenizers from folders) reads it from there.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from appliance.model.atomic_folder import ensure_folder
from appliance.model.loader import LoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def ensure_gguf_tokenizer(gguf: str | Path, cache: str | Path) -> Path:
    """The tokenizer folder of `gguf` under `cache`, converted on first use."""
    gguf = Path(gguf).resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return ensure_folder(Path(cache) / f"{gguf.stem}-{key}", TOKENIZER_FILES,
                         lambda out: _convert(gguf, out))


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise LoadError(f"{gguf}: transformers cannot build a tokenizer from its metadata: "
                        f"{e}") from None
    tokenizer.save_pretrained(out)
