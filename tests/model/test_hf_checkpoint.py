"""A damaged HF checkpoint folder stops start-up with one line naming the file and the key, before
any rank loads it (ranks failed deep in a reader: `SafetensorError: header too small`,
`KeyError: 'hidden_size'`; a damaged tokenizer file failed only once the ranks had loaded, and a
FIFO for a file blocked start-up for ever); a config.json of another model size is refused."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config
from appliance.engine.model_files import resolve_model_files
from appliance.model.hf_checkpoint import check_hf_checkpoint
from appliance.model.load_error import LoadError
from appliance.model.tiny import ensure_tiny_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("good") / "tiny")


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])


def _folder_for_file(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()


def _fifo_for(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).unlink(missing_ok=True)
        os.mkfifo(folder / name)
    return damage


def _cut(name: str, size: int) -> Callable[[Path], None]:
    return lambda folder: os.truncate(folder / name, size)


def _index(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "model.safetensors.index.json").write_text(text)


BROKEN = {
    "truncated": (_truncate, "model.safetensors: not a readable safetensors file"),
    "empty": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors: not a readable"),
    "a folder": (_folder_for_file, "model.safetensors: not a regular file"),
    "a FIFO": (_fifo_for("model.safetensors"), "model.safetensors: not a regular file"),
    "generation config a FIFO": (_fifo_for("generation_config.json"),
                                 "generation_config.json: not a regular file"),
    "tokenizer cut short": (_cut("tokenizer.json", 1000), "tokenizer.json: not valid JSON"),
    "tokenizer config not text": (lambda f: (f / "tokenizer_config.json").write_bytes(b"\xf6\x00" * 50),
                                  "tokenizer_config.json: not valid JSON"),
    "tokenizer a FIFO": (_fifo_for("tokenizer.json"), "tokenizer.json: not a regular file"),
    "index not JSON": (_index("{not json"), "model.safetensors.index.json: not valid JSON"),
    "index a list": (_index("[1, 2]"), "model.safetensors.index.json: expected a JSON object"),
    "index without its file": (_index('{"weight_map": {"lm_head.weight": "other.safetensors"}}'),
                               "model.safetensors.index.json: lists files that do not exist"),
    "index naming a FIFO": (lambda f: (_fifo_for("model.safetensors")(f), _index(
        '{"weight_map": {"lm_head.weight": "model.safetensors"}}')(f)), "model.safetensors: not a regular file"),
    "generation config": (lambda f: (f / "generation_config.json").write_text("{garbage"),
                          "generation_config.json: not valid JSON"),
    "no hidden_size": (_edit_config(hidden_size=None), "config.json: lacks hidden_size"),
    "zero heads": (_edit_config(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
    "negative size": (_edit_config(hidden_size=-64), "hidden_size must be a positive integer, got -64"),
    "architectures a string": (_edit_config(architectures="LlamaForCausalLM"), "architectures must be a list"),
    "fewer layers": (_edit_config(num_hidden_layers=1), "decoder layers 0..1, but config.json's num_hidden_layers is 1"),
    "no intermediate_size": (_edit_config(intermediate_size=None), "config.json: lacks intermediate_size"),
    "context of 0": (_edit_config(max_position_embeddings=0), "max_position_embeddings must be a positive integer"),
    "eps a string": (_edit_config(rms_norm_eps="x"), "rms_norm_eps must be a positive number, got 'x'"),
    "eos past the vocabulary": (_edit_config(eos_token_id=10**30), "config.json: eos_token_id must be token ids in"),
    "generation eos a string": (lambda f: (f / "generation_config.json").write_text('{"eos_token_id": ["x"]}'),
                                "generation_config.json: eos_token_id must be token ids in"),
}


def test_the_tiny_checkpoint_passes(good):
    check_hf_checkpoint(good)


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_damaged_folder_is_named_in_one_line(name, good, tmp_path, monkeypatch):
    damage, message = BROKEN[name]
    folder = Path(shutil.copytree(good, tmp_path / "model"))
    damage(folder)
    with pytest.raises(LoadError, match=message.replace(".", r"\.").replace("[", r"\[")):
        check_hf_checkpoint(folder)
    monkeypatch.setenv("TOKENSPEED_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=f"^model.path: {folder}"):   # what start-up prints
        resolve_model_files(load_config(None, [f"model.path={folder}"]))


def test_next_token_layers_after_the_last_are_the_checkpoints_own(good, tmp_path):
    """MTP layers (DeepSeek-V3, GLM-4.5) are stored as the layers after num_hidden_layers."""
    folder = Path(shutil.copytree(good, tmp_path / "model"))
    _edit_config(num_hidden_layers=1, num_nextn_predict_layers=1)(folder)
    check_hf_checkpoint(folder)
