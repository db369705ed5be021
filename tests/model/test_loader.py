"""Checkpoint loading: sharded folders with an index, dummy presets, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from appliance.model import ModelRunner, ModelSource
from appliance.model.loader import LoadError, dummy_value
from appliance.model.presets import PRESETS, preset_config
from helpers import greedy_generate, hf_greedy, save_tiny_hf_model

PROMPTS = [[5, 9, 33, 7, 100, 21, 3], list(range(10, 30))]


@pytest.fixture(scope="module")
def single_folder(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("single"), "llama", seed=1)


def test_sharded_checkpoint_with_index(tmp_path):
    import transformers

    torch.manual_seed(2)
    from helpers import tiny_hf_config
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config("llama"))
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    assert not (tmp_path / "model.safetensors").exists()
    runner = ModelRunner(str(tmp_path), kv_num_pages=32, page_size=8)
    assert greedy_generate(runner, PROMPTS, 6) == hf_greedy(tmp_path, PROMPTS, 6)


def _rewrite(src, dst, edit) -> None:
    dst.mkdir()
    for f in ("config.json", "generation_config.json"):
        (dst / f).write_text((src / f).read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")


def test_missing_tensor_is_named(single_folder, tmp_path):
    bad = tmp_path / "bad"
    _rewrite(single_folder, bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(LoadError, match=r"lacks tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        ModelRunner(str(bad), kv_num_pages=8)


def test_wrong_shape_is_named(single_folder, tmp_path):
    bad = tmp_path / "bad"

    def transpose(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].T.contiguous()

    _rewrite(single_folder, bad, transpose)
    with pytest.raises(LoadError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has "
                                        r"shape \(64, 32\), the model expects \(32, 64\)"):
        ModelRunner(str(bad), kv_num_pages=8)


def test_index_missing_tensor_is_named(single_folder, tmp_path):
    bad = tmp_path / "bad"
    _rewrite(single_folder, bad, lambda t: None)
    names = list(load_file(bad / "model.safetensors"))
    names.remove("model.norm.weight")
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}))
    with pytest.raises(LoadError, match=r"lacks tensor\(s\) model\.norm\.weight \(not in model"):
        ModelRunner(str(bad), kv_num_pages=8)


def test_quantized_config_is_refused(single_folder, tmp_path):
    bad = tmp_path / "bad"
    _rewrite(single_folder, bad, lambda t: None)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"quantized \(quantization_config\.quant_method = 'fp8'\)"):
        ModelRunner(str(bad), kv_num_pages=8)


def test_fp8_weight_is_refused(single_folder, tmp_path):
    """An FP8 tensor without a quantization_config: cast to bf16 it would load as garbage."""
    bad = tmp_path / "bad"
    name = "model.layers.0.mlp.down_proj.weight"

    def to_fp8(t):
        t[name] = t[name].to(torch.float8_e4m3fn)

    _rewrite(single_folder, bad, to_fp8)
    with pytest.raises(LoadError, match=rf"tensor {name} is F8_E4M3"):
        ModelRunner(str(bad), kv_num_pages=8)


def test_unknown_architecture(single_folder, tmp_path):
    bad = tmp_path / "bad"
    _rewrite(single_folder, bad, lambda t: None)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architectures \['GPT2LMHeadModel'\]"):
        ModelRunner(str(bad), kv_num_pages=8)


def test_eos_from_generation_config(single_folder):
    runner = ModelRunner(str(single_folder), kv_num_pages=8)
    assert runner.eos_token_ids == [2] and runner.vocab_size == 160


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama-3.1-8b", "qwen3-8b"])
def test_dummy_preset_real_width(preset):
    """A real model's layer at full width. For speed the test keeps ONE decoder layer and a
    4096-token vocabulary (num_hidden_layers / vocab_size overridden); every other dim is the
    preset's own."""
    cfg = preset_config(preset, num_hidden_layers=1, vocab_size=4096)
    src = ModelSource(load_format="dummy", hf_config=cfg, seed=3)
    runner = ModelRunner(src, dtype=torch.bfloat16, kv_num_pages=4, page_size=16)
    attn = runner.model.model.layers[0].self_attn
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    assert attn.qkv_proj.weight.shape == ((heads + 2 * kv) * d, cfg["hidden_size"])
    assert runner.model.model.layers[0].mlp.gate_up_proj.weight.shape == (
        2 * cfg["intermediate_size"], cfg["hidden_size"])
    assert runner.kv_caches[0][0].shape == (4 * 16, kv, d)
    assert runner.eos_token_ids == PRESETS[preset]["eos_token_id"]
    tokens, = greedy_generate(runner, [[1, 2, 3, 4, 5]], 3)
    assert len(tokens) == 3 and all(0 <= t < 4096 for t in tokens)
    # seeded per tensor name: the loaded weights are exactly dummy_value's
    name = "model.layers.0.mlp.down_proj.weight"
    want = dummy_value(name, (cfg["hidden_size"], cfg["intermediate_size"]), 3, torch.device("cpu"))
    got = runner.model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(got, want.to(torch.bfloat16))
    assert 0.015 < want.std().item() < 0.025  # N(0, 0.02)


def test_presets_are_complete():
    assert {"llama-3.1-8b", "qwen3-8b", "deepseek-v2-lite", "kimi-k2.5"} <= set(PRESETS)
    for name, cfg in PRESETS.items():
        for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings", "eos_token_id"):
            assert key in cfg, f"{name} lacks {key}"
    with pytest.raises(KeyError, match="unknown model preset 'nope'"):
        preset_config("nope")


def test_multimodal_wrapper_config_uses_text_config(single_folder, tmp_path):
    """Kimi K2.5-style config.json: the language model's config sits under text_config."""
    wrapped = tmp_path / "wrapped"
    _rewrite(single_folder, wrapped, lambda t: None)
    inner = json.loads((wrapped / "config.json").read_text())
    (wrapped / "config.json").write_text(json.dumps(
        {"architectures": ["SomeVisionWrapper"], "text_config": inner}))
    runner = ModelRunner(str(wrapped), kv_num_pages=16, page_size=8)
    plain = ModelRunner(str(single_folder), kv_num_pages=16, page_size=8)
    assert greedy_generate(runner, PROMPTS, 4) == greedy_generate(plain, PROMPTS, 4)


def test_a_weight_holding_nan_is_named(single_folder, tmp_path):
    """Bit rot or a bad conversion: the daemon served empty answers from such weights."""
    bad = tmp_path / "bad"

    def poison(t):
        t["model.norm.weight"][3] = float("nan")

    _rewrite(single_folder, bad, poison)
    with pytest.raises(LoadError, match=r"parameter .*norm.* holds NaN or infinite values"):
        ModelRunner(str(bad), kv_num_pages=8)
