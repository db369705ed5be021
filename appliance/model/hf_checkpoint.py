"""An HF checkpoint folder's files, torch-free (the frontend reads them too): which safetensors
files hold the weights, config.json's language-model part, and the checks start-up runs before
any rank loads the folder: every file a rank will read opens, config.json's sizes are usable,
and the weights are of the model config.json describes. Each problem is a LoadError naming the
file (and the key), where a rank would fail deep inside a reader with neither."""
from __future__ import annotations

import json
import re
from pathlib import Path

from appliance.model.load_error import LoadError, check_regular_file

REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                  "vocab_size")
OPTIONAL_SIZES = ("moe_intermediate_size", "num_key_value_heads", "head_dim", "max_position_embeddings")
OPTIONAL_POSITIVE = ("rms_norm_eps", "rope_theta")  # numbers, when given
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# the tokenizer's JSON files (transformers reads those present): damaged, they would fail the
# frontend's tokenizer load only once every rank had loaded its weights
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json")


def check_hf_checkpoint(folder: Path) -> None:
    """LoadError for the first problem found in `folder` (config.json, generation_config.json,
    model.safetensors.index.json, the safetensors headers, layers beyond the config's)."""
    config = language_config(json_object(folder / "config.json"))
    _check_sizes(config, folder / "config.json")
    _check_eos(config, folder / "config.json", config["vocab_size"])
    if (folder / "generation_config.json").exists():
        _check_eos(json_object(folder / "generation_config.json"), folder / "generation_config.json",
                   config["vocab_size"])
    names = _tensor_names(folder)
    _check_layer_count(config, names, folder)
    for name in TOKENIZER_JSON:
        if (folder / name).exists():
            json_object(folder / name)


def json_object(path: Path) -> dict:
    """The JSON object in `path`; LoadError naming the file if it is not one."""
    check_regular_file(path)
    try:
        value = json.loads(path.read_bytes())
    except OSError as e:
        raise LoadError(f"{path}: cannot be read: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise LoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def language_config(config: dict) -> dict:
    """config.json's language model: a multimodal wrapper's text_config (Kimi K2.5), with the
    wrapper's architectures when it names none."""
    text = config.get("text_config")
    if not isinstance(text, dict) or "hidden_size" in config:
        return config
    return {**text, "architectures": text.get("architectures", config.get("architectures"))}


def checkpoint_files(folder: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a folder, and the index's tensor -> file map if any."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    weight_map = None
    if index.is_file():
        weight_map = json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise LoadError(f"{index}: weight_map must map tensor names to file names")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise LoadError(f"{index}: lists files that do not exist: {missing}")
    else:
        single = folder / "model.safetensors"
        files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
        if not files:
            raise LoadError(f"{folder}: no *.safetensors files")
    for file in files:
        check_regular_file(file)
    return files, weight_map


def _check_sizes(config: dict, path: Path) -> None:
    architectures = config.get("architectures")
    if architectures is not None and not (
            isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise LoadError(f"{path}: architectures must be a list of names, got {architectures!r}")
    for key in REQUIRED_SIZES + OPTIONAL_SIZES:
        value = config.get(key)
        if value is None and key in OPTIONAL_SIZES:
            continue
        if value is None:
            raise LoadError(f"{path}: lacks {key}")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LoadError(f"{path}: {key} must be a positive integer, got {value!r}")
    for key in OPTIONAL_POSITIVE:
        value = config.get(key)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)
                                  or not 0 < value < float("inf")):
            raise LoadError(f"{path}: {key} must be a positive number, got {value!r}")


def _check_eos(config: dict, path: Path, vocab_size: int) -> None:
    """eos_token_id, when given: a token id of the vocabulary, or a list of them."""
    eos = config.get("eos_token_id")
    for token in eos if isinstance(eos, list) else [] if eos is None else [eos]:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            raise LoadError(f"{path}: eos_token_id must be token ids in [0, {vocab_size}), got {eos!r}")


def _tensor_names(folder: Path) -> set[str]:
    """The checkpoint's tensor names, once every file's header has been read."""
    files, weight_map = checkpoint_files(folder)
    names = {name for file in files for name in _header_names(file)}
    return set(weight_map) if weight_map is not None else names


def open_safetensors(file: Path, framework: str = "numpy", **options):
    """safe_open, its header read and checked (the file must be as long as the header says); a
    file it cannot read is a LoadError naming it. numpy needs no torch; the loader asks "pt"."""
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework=framework, **options)
    except Exception as e:  # SafetensorError, OSError: which one matters less than the file
        raise LoadError(f"{file}: not a readable safetensors file: {e}") from None


def _header_names(file: Path) -> list[str]:
    with open_safetensors(file) as f:
        return list(f.keys())


def _check_layer_count(config: dict, names: set[str], folder: Path) -> None:
    """Decoder layers past num_hidden_layers (and the MTP layers after them) would be left
    unread, and the model served would not be the checkpoint's: a config.json of another size."""
    layers = [int(m.group(1)) for name in names if (m := _LAYER.match(name))]
    expected = config["num_hidden_layers"] + int(config.get("num_nextn_predict_layers") or 0)
    if layers and max(layers) >= expected:
        raise LoadError(f"{folder}: the weights hold decoder layers 0..{max(layers)}, but "
                        f"config.json's num_hidden_layers is {config['num_hidden_layers']}: is "
                        "config.json another model size's?")
