"""The model's sampling defaults read from its checkpoint's generation_config.json: the four
fields it may set, the APIs' defaults where it sets none (or has no such file), and a
config error naming the file and the key for a value the engine cannot use."""

from __future__ import annotations

import json

import pytest

from appliance.config import ConfigError
from appliance.engine.model_files import ModelFiles
from appliance.engine.sampling_defaults import SamplingDefaults, read_sampling_defaults


def _folder(tmp_path, generation: dict | None):
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return ModelFiles(str(tmp_path), None, str(tmp_path))


def test_the_models_fields_are_read(tmp_path):
    files = _folder(tmp_path, {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                               "repetition_penalty": 1.05, "eos_token_id": [2], "max_new_tokens": 9})
    defaults = read_sampling_defaults(files)
    assert defaults == SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert defaults.changed() == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def test_fields_left_out_keep_the_apis_defaults(tmp_path):
    defaults = read_sampling_defaults(_folder(tmp_path, {"temperature": 1, "top_k": -1, "top_p": None}))
    assert defaults == SamplingDefaults()  # vLLM's top_k -1 is off, like HF's 0; null: not set
    assert isinstance(defaults.temperature, float) and defaults.changed() == {}


def test_no_file_dummy_weights_or_source_api_use_the_apis_defaults(tmp_path):
    assert read_sampling_defaults(_folder(tmp_path, None)) == SamplingDefaults()
    files = _folder(tmp_path, {"temperature": 0.7})
    assert read_sampling_defaults(files, "api") == SamplingDefaults() != read_sampling_defaults(files)
    assert read_sampling_defaults(ModelFiles(None, "llama-3.1-8b", str(tmp_path))) == SamplingDefaults()
    prepared = tmp_path / "tokenizer"   # a GGUF's tokenizer folder: the file recommended none
    prepared.mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert read_sampling_defaults(ModelFiles(str(tmp_path / "m.gguf"), None, str(prepared))) == SamplingDefaults()


def test_fill_takes_what_was_sent():
    defaults = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert defaults.fill(temperature=None, top_p=None, top_k=None) == {
        "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert defaults.fill(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0) == {
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    assert defaults.fill(temperature=None, top_p=None, top_k=-1)["top_k"] == 0  # OpenAI's off


@pytest.mark.parametrize("field,value,problem", [
    ("temperature", -0.1, "temperature must be in [0, 2]"),
    ("temperature", 3.0, "temperature must be in [0, 2]"),
    ("temperature", "0.7", "temperature must be a finite number"),
    ("temperature", True, "temperature must be a finite number"),
    ("top_p", 0.0, "top_p must be in ["),
    ("top_p", 1.5, "top_p must be in ["),
    ("top_k", 2.5, "top_k must be an integer"),
    ("top_k", -2, "top_k must be an integer"),
    ("top_k", 2**31, "top_k must be an integer"),
    ("repetition_penalty", 0.0, "repetition_penalty must be in ["),
    ("repetition_penalty", [1.1], "repetition_penalty must be a finite number"),
])
def test_a_value_the_engine_cannot_use_is_a_config_error(tmp_path, field, value, problem):
    with pytest.raises(ConfigError) as e:
        read_sampling_defaults(_folder(tmp_path, {field: value}))
    assert str(e.value).startswith(f"model.path: {tmp_path / 'generation_config.json'}: {problem}")


def test_infinity_is_a_config_error(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"temperature": Infinity}')  # Python's JSON reads it
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        read_sampling_defaults(ModelFiles(str(tmp_path), None, str(tmp_path)))

