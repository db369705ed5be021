"""A GGUF file's tokenizer and chat template as an HF tokenizer folder, beside its config.

transformers converts the `tokenizer.ggml.*` metadata into a fast tokenizer
(`AutoTokenizer.from_pretrained(folder, gguf_file=name)`, which keeps
`tokenizer.chat_template`); that takes seconds, so the result is saved once into a cache
folder named after the file's path, size and modification time, and every later start
(and the frontend, which loads tokenizers from folders) reads it from there. The folder also
keeps the file's HF-style config (`GGUF_CONFIG`, gguf_files.read_gguf_config), written
once the file passed its checks (architecture, tensor types), its tensor index
(`TENSOR_INDEX`) and, where the file recommends sampling (`general.sampling.*`), that as a
`GENERATION_CONFIG` (engine/sampling_defaults.py reads it as an HF folder's); so a later
start and the engine ranks skip the file's metadata: reading it parses its whole vocabulary
(4-5 s for SmolLM2's 49K tokens on a 2-core box), which the frontend would otherwise do
before it spawns the ranks, and each rank again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from appliance.model.atomic_folder import ensure_folder
from appliance.model.gguf_files import GGUF_CONFIG, TENSOR_INDEX
from appliance.model.load_error import LoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FOLDER_VERSION = 4   # 2: with GGUF_CONFIG; 3: with TENSOR_INDEX; 4: with GENERATION_CONFIG
GENERATION_CONFIG = "generation_config.json"


def ensure_gguf_tokenizer(gguf: str | Path, cache: str | Path) -> Path:
    """The tokenizer folder of `gguf` under `cache`, converted on first use (LoadError for
    a file TokenSpeed cannot read: its config is checked first)."""
    gguf = Path(gguf).resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{FOLDER_VERSION}".encode()
                         ).hexdigest()[:16]
    return ensure_folder(Path(cache) / f"{gguf.stem}-{key}",
                         (GGUF_CONFIG, TENSOR_INDEX, *TOKENIZER_FILES),
                         lambda out: _convert(gguf, out))


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    from appliance.model.gguf_files import read_gguf_config, read_gguf_sampling, write_tensor_index

    (out / GGUF_CONFIG).write_text(json.dumps(read_gguf_config(gguf)))
    write_tensor_index(gguf, out)
    sampling = read_gguf_sampling(gguf)
    if sampling:
        (out / GENERATION_CONFIG).write_text(json.dumps(sampling))

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise LoadError(f"{gguf}: transformers cannot build a tokenizer from its metadata: "
                        f"{e}") from None
    tokenizer.save_pretrained(out)
