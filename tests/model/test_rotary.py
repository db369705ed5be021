"""RoPE tables against transformers' own inverse frequencies, for both config spellings."""
from __future__ import annotations

import pytest
import torch

from appliance.model.layers.rotary import inv_frequencies, rope_config
from appliance.model.presets import preset_config


def _hf_inv_freq(cfg: dict) -> torch.Tensor:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    conf = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    rope_type = conf.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        dim = conf.head_dim
        theta = conf.rope_parameters["rope_theta"]
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](conf, "cpu")
    assert scale == 1.0
    return inv


@pytest.mark.parametrize("cfg", [
    preset_config("llama-3.1-8b"),                                   # v4: rope_theta + rope_scaling
    {**preset_config("llama-3.1-8b", rope_scaling=None, rope_theta=None),  # v5: rope_parameters
     "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}},
    preset_config("llama-3.1-8b", rope_scaling={"type": "linear", "factor": 4.0}),
    preset_config("qwen3-8b"),                                       # plain
], ids=["llama3-v4", "llama3-v5", "linear", "default"])
def test_inv_freq_matches_transformers(cfg):
    rc = rope_config(cfg)
    ours = inv_frequencies(rc, cfg["head_dim"])
    torch.testing.assert_close(ours, _hf_inv_freq(cfg), rtol=1e-6, atol=0)


def test_both_spellings_agree_and_unknown_type_is_named():
    v4 = rope_config(preset_config("llama-3.1-8b"))
    v5 = rope_config({"max_position_embeddings": 131072, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert v4 == v5
    with pytest.raises(ValueError, match="rope_type 'longrope' is not supported"):
        rope_config({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_context_length_under_yarn():
    """Qwen2.5 keeps max_position_embeddings at its pretraining 32K and extends with YaRN:
    it serves original x factor (as vLLM). DeepSeek's config already states the long one."""
    from appliance.model.layers.yarn import context_length

    qwen = {"max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert context_length(qwen) == 131072
    assert context_length(preset_config("deepseek-v2-lite")) == 163840
    assert context_length(preset_config("llama-3.1-8b")) == 131072
    assert context_length({}) == 4096
