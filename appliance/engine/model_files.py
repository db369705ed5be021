"""Where the daemon's weights and tokenizer come from, decided once from `model.*` config keys.

- `model.path`: an HF folder (config.json + safetensors + tokenizer files), a `.gguf` file,
  or a folder holding one `.gguf`. A GGUF's tokenizer and chat template are converted once
  into `$TOKENSPEED_CACHE/tokenizers/` (appliance/model/gguf_tokenizer.py).
- `model.preset` with real weights: `tiny-llama` (generated into the cache on first use) or
  a preset whose weights an installed package ships (`presets.PACKAGED`, e.g. the default
  `smollm2-135m-instruct`).
- `model.preset` with `load_format: dummy`: random weights in the preset's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.config import AppConfig, ConfigError, cache_dir

TINY_PRESET = "tiny-llama"


@dataclass(frozen=True)
class ModelFiles:
    checkpoint: str | None  # HF folder or .gguf file; None for dummy weights
    preset: str | None  # preset name when the weights are dummy
    tokenizer: str  # folder with tokenizer.json + tokenizer_config.json


def resolve_model_files(config: AppConfig) -> ModelFiles:
    """Map model.path / model.preset / model.load_format to files, creating the tiny model
    or a GGUF's tokenizer folder when they are missing (a cache that cannot take them: a
    ConfigError naming the folder)."""
    from appliance.model.atomic_folder import CacheWriteError

    try:
        return _resolve(config)
    except CacheWriteError as e:
        raise ConfigError(f"{e} (the cache folder; TOKENSPEED_CACHE moves it)") from None


def _resolve(config: AppConfig) -> ModelFiles:
    from appliance.model import presets, tiny  # the tiny checkpoint's weights need torch

    model = config.model
    if model.path:
        return _checkpoint_files(Path(model.path).expanduser(), "model.path", model.load_format)
    if model.preset in presets.PACKAGED and model.load_format != "dummy":
        try:
            path = presets.packaged_weights(model.preset)
        except FileNotFoundError as e:
            raise ConfigError(f"model.preset: {e}") from None
        return _checkpoint_files(path, "model.preset", model.load_format)
    if model.preset == TINY_PRESET and model.load_format != "dummy":
        tiny_folder = tiny.ensure_tiny_checkpoint(cache_dir() / "models" / TINY_PRESET)
        _check_hf_folder(tiny_folder, f"model.preset (remove {tiny_folder} to have it made again)")
        return ModelFiles(str(tiny_folder), None, str(tiny_folder))
    if model.preset not in presets.PRESETS:
        known = ", ".join(sorted(presets.PRESETS))
        raise ConfigError(f"model.preset: unknown preset {model.preset!r} (known: {known})")
    if model.load_format != "dummy":
        raise ConfigError(f"model.load_format: preset {model.preset!r} has no weights on this "
                          "machine; use load_format: dummy or model.path")
    # Dummy weights have no tokenizer of their own: the tiny model's byte-level BPE stands in.
    tokenizer = tiny.ensure_tiny_tokenizer(cache_dir() / "models" / f"{TINY_PRESET}-tokenizer")
    return ModelFiles(None, model.preset, str(tokenizer))


def _checkpoint_files(path: Path, key: str, load_format: str) -> ModelFiles:
    from appliance.model.gguf_files import find_gguf
    from appliance.model.gguf_tokenizer import ensure_gguf_tokenizer
    from appliance.model.load_error import LoadError

    try:
        gguf = find_gguf(path)
        if gguf is None:
            if not (path / "config.json").is_file():
                raise ConfigError(f"{key}: no config.json or .gguf file in {path}")
            _check_hf_folder(path, key)
            return ModelFiles(str(path), None, str(path))
        if load_format == "safetensors":
            raise ConfigError(f"model.load_format: safetensors, but {key} is a GGUF file ({gguf})")
        # an architecture or tensor type we cannot read stops start-up here (checked when the
        # tokenizer folder is made, which then keeps the config: gguf_tokenizer.py)
        tokenizer = ensure_gguf_tokenizer(gguf, cache_dir() / "tokenizers")
        return ModelFiles(str(gguf), None, str(tokenizer))
    except LoadError as e:
        raise ConfigError(f"{key}: {e}") from None


def _check_hf_folder(path: Path, key: str) -> None:
    from appliance.model.hf_checkpoint import check_hf_checkpoint
    from appliance.model.load_error import LoadError

    try:
        check_hf_checkpoint(path)
    except LoadError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_mtp_checkpoint(config: AppConfig, files: ModelFiles) -> None:
    """At start-up, before any rank loads: `speculative.method: mtp` needs a model whose
    architecture runs MTP layers and whose checkpoint holds them (`files`:
    model_files.ModelFiles; a dummy preset's are generated)."""
    if config.speculative.method != "mtp":
        return
    from appliance.model import presets
    from appliance.model.loader import checkpoint_tensor_names, read_hf_config
    from appliance.model.models import model_class
    from appliance.model.mtp import NextTokenLayers, mtp_layer_count

    if files.checkpoint is not None:
        hf, names, what = (read_hf_config(files.checkpoint),
                           checkpoint_tensor_names(files.checkpoint), files.checkpoint)
    else:
        hf, names, what = presets.preset_config(files.preset), None, f"preset {files.preset}"
    try:
        cls = model_class(hf.get("architectures"))
    except ValueError:
        return  # an architecture this build lacks: the ranks report it
    if not issubclass(cls, NextTokenLayers) or mtp_layer_count(hf, names) == 0:
        raise ConfigError(
            "speculative.method: mtp needs a checkpoint with next-token (MTP) layers (the "
            "DeepSeek-V3 or GLM-4.5 families, num_nextn_predict_layers > 0 and the layers' "
            f"tensors); {what} has none: use suffix or ngram")
