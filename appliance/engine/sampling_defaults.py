"""The sampling a request gets for the fields it leaves out: the model's own recommendation in
its checkpoint's generation_config.json (temperature, top_p, top_k, repetition_penalty), as vLLM
and SGLang apply it, else the APIs' defaults (temperature 1, every token kept, no penalty).

Coding models ask for it (Qwen3-Coder: temperature 0.7, top_p 0.8, top_k 20, repetition
penalty 1.05), and agents often send only a temperature, or nothing. A field the request sends
always wins. Like vLLM, `do_sample` is not read: a request's temperature 0 is greedy, anything
else samples. Read once at start-up, before any rank loads; a value the engine cannot use is a
ConfigError naming the file and the key. Torch-free (the frontend reads it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from appliance.config import ConfigError
from appliance.engine.model_files import ModelFiles
from appliance.engine.protocol import MAX_REPETITION_PENALTY, MIN_TOP_P

INT32_MAX = 2**31 - 1
MAX_TEMPERATURE = 2.0  # OpenAI's range; a model's file asking for more is a mistake


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0

    def fill(self, *, temperature: float | None, top_p: float | None, top_k: int | None,
             repetition_penalty: float | None = None) -> dict[str, float | int]:
        """SamplingOptions' fields: each one the request sent (None: it did not), else this
        default. A top_k of 0 (or OpenAI's -1) sent turns top-k off."""
        sent = {"temperature": temperature, "top_p": top_p,
                "top_k": None if top_k is None else max(0, top_k),
                "repetition_penalty": repetition_penalty}
        return {name: getattr(self, name) if value is None else value for name, value in sent.items()}

    def changed(self) -> dict[str, float | int]:
        """The fields the model changed from the APIs' defaults (for the start-up log)."""
        api = SamplingDefaults()
        return {name: value for name, value in asdict(self).items() if value != getattr(api, name)}


def read_sampling_defaults(files: ModelFiles, source: str = "model") -> SamplingDefaults:
    """The checkpoint folder's generation_config.json's sampling fields, or a GGUF file's
    `general.sampling.*` keys (temp, top_p, top_k: gguf_files.SAMPLING_KEYS, kept as a
    generation_config.json in its prepared tokenizer folder); the APIs' defaults for `source`
    api (`model.sampling_defaults`), dummy weights or a checkpoint that recommends none."""
    from appliance.model.hf_checkpoint import json_object
    from appliance.model.load_error import LoadError

    if source == "api" or files.checkpoint is None:
        return SamplingDefaults()
    checkpoint = Path(files.checkpoint)
    path = (checkpoint if checkpoint.is_dir() else Path(files.tokenizer)) / "generation_config.json"
    if not path.exists():
        return SamplingDefaults()
    try:
        config = json_object(path)
    except LoadError as e:
        raise ConfigError(f"model.path: {e}") from None
    values = {f.name: config[f.name] for f in fields(SamplingDefaults) if config.get(f.name) is not None}
    for name, value in values.items():
        problem = _problem(name, value)
        if problem:
            raise ConfigError(f"model.path: {_where(checkpoint, path, name)} {problem}, "
                              f"got {value!r}")
    numbers = {name: max(0, value) if name == "top_k" else float(value)  # top_k -1 (vLLM's off): 0
               for name, value in values.items()}
    return SamplingDefaults(**numbers)


def _where(checkpoint: Path, path: Path, name: str) -> str:
    """The file and key a default came from: an HF folder's generation_config.json, or the
    GGUF file's own key (its prepared copy is not what the user wrote)."""
    if checkpoint.is_dir():
        return f"{path}: {name}"
    from appliance.model.gguf_files import SAMPLING_KEYS
    return f"{checkpoint}: {SAMPLING_KEYS[name]}"


def _problem(name: str, value: object) -> str:
    """What is wrong with one field's value ("" if nothing): the ranges the request fields
    accept at the edge."""
    if name == "top_k":
        ok = isinstance(value, int) and not isinstance(value, bool) and -1 <= value <= INT32_MAX
        return "" if ok else f"must be an integer in [-1, {INT32_MAX}] (0 or -1: off)"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "must be a finite number"
    low, high = {"temperature": (0.0, MAX_TEMPERATURE), "top_p": (MIN_TOP_P, 1.0),
                 "repetition_penalty": (1 / MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY)}[name]
    return "" if low <= value <= high else f"must be in [{low:g}, {high:g}]"
