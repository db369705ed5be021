"""Tiny random Qwen3-MoE and GLM-4.5 MoE checkpoints, made by transformers with widened
weights (helpers.widen_weights), for the MoE model tests (test_moe_models.py through
ModelRunner, test_moe_http.py through the daemon)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from helpers import widen_weights

PROMPTS = [[5, 9, 33, 7, 100, 21, 3], [8, 8, 8], list(range(10, 40)), [151, 2, 77, 0, 64]]
MAX_NEW = 8

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (architecture, config overrides)
CONFIGS: dict[str, tuple[str, dict]] = {
    # Qwen3-Coder's shape: renormalised softmax top-k; layer 1 listed in mlp_only_layers
    "qwen3-moe": ("qwen3_moe", dict(head_dim=24, num_experts=8, num_experts_per_tok=3,
                                    norm_topk_prob=True, mlp_only_layers=[1])),
    # MoE on every 2nd layer only (decoder_sparse_step), weights not renormalised, q/k/v/o bias
    "qwen3-moe-step2": ("qwen3_moe", dict(head_dim=16, num_experts=8, num_experts_per_tok=2,
                                          norm_topk_prob=False, decoder_sparse_step=2,
                                          attention_bias=True)),
    # GLM-4.5-Air's shape: q/k/v bias, no q/k norm, half-rotary heads, one shared expert, scale 1
    "glm-4.5-air": ("glm4_moe", dict(head_dim=32, attention_bias=True, use_qk_norm=False,
                                     n_routed_experts=8, n_shared_experts=1,
                                     num_experts_per_tok=3, first_k_dense_replace=1,
                                     routed_scaling_factor=1.0)),
    # GLM-4.5's: q/k norm, two dense layers; plus group-limited routing (4 groups, best 2),
    # two shared experts, routed scaling 2.5 and a quarter of each head rotated
    "glm-4.5-grouped": ("glm4_moe", dict(head_dim=32, attention_bias=True, use_qk_norm=True,
                                         n_routed_experts=8, n_shared_experts=2,
                                         num_experts_per_tok=3, first_k_dense_replace=2,
                                         n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                         partial_rotary_factor=0.25)),
}


def save_tiny_moe(folder: Path, name: str, seed: int = 11, **over) -> Path:
    """CONFIGS[name] (with `over`) as a seeded random HF model, `save_pretrained` to folder."""
    import transformers

    arch, config_over = CONFIGS[name]
    cfg_cls, model_cls = ((transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM)
                          if arch == "qwen3_moe" else
                          (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM))
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**COMMON, **config_over, **over}))
    widen_weights(model)
    model.save_pretrained(folder)
    return folder


def with_tokenizer(folder: Path, tokenizer_folder: Path) -> Path:
    """Copy a tokenizer beside the weights, so that the daemon can serve the folder."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return folder
