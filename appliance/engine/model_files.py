"""Where the daemon's weights and tokenizer come from, decided once from `model.*` config keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.config import AppConfig, ConfigError, cache_dir

TINY_PRESET = "tiny-llama"


@dataclass(frozen=True)
class ModelFiles:
    checkpoint: str | None  # HF folder with config.json + safetensors; None for dummy weights
    preset: str | None  # preset name when the weights are dummy
    tokenizer: str  # folder with tokenizer.json + tokenizer_config.json


def resolve_model_files(config: AppConfig) -> ModelFiles:
    """Map model.path / model.preset / model.load_format to folders, creating the tiny model."""
    from appliance.model import presets, tiny  # creating the tiny checkpoint needs torch

    model = config.model
    if model.path:
        folder = Path(model.path).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path: no config.json in {folder}")
        return ModelFiles(str(folder), None, str(folder))
    tiny_folder = str(tiny.ensure_tiny_checkpoint(cache_dir() / "models" / TINY_PRESET))
    if model.preset == TINY_PRESET and model.load_format != "dummy":
        return ModelFiles(tiny_folder, None, tiny_folder)
    if model.preset not in presets.PRESETS and model.preset != TINY_PRESET:
        known = ", ".join(sorted([TINY_PRESET, *presets.PRESETS]))
        raise ConfigError(f"model.preset: unknown preset {model.preset!r} (known: {known})")
    if model.load_format != "dummy":
        raise ConfigError(f"model.load_format: preset {model.preset!r} has no weights on this "
                          "machine; use load_format: dummy or model.path")
    # Dummy weights have no tokenizer of their own: the tiny model's byte-level BPE stands in.
    return ModelFiles(None, model.preset, tiny_folder)
