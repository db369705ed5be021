"""Tiny DeepSeek-V3 and GLM-4.5 checkpoints that carry a multi-token-prediction layer.

transformers saves no MTP tensors, so a random HF model of L + 1 layers is saved and then
re-read as L decoder layers plus one MTP layer: its last decoder layer becomes the MTP
layer's block (`model.layers.{L}.*`, the name real checkpoints use), and the MTP parts
(enorm, hnorm, eh_proj, shared_head.norm; the embedding and LM-head copies real checkpoints
also store) are written beside it. The folder of L + 1 layers stays, so a test can run that
block through transformers as the reference.

With `echo`, the MTP layer repeats the target's prediction for the position it reads
(eh_proj passes hnorm(h) only, the block's output projections are zero, hnorm undoes the
final norm's weight g and shared_head.norm applies it again, so z = h), so its drafts (the
target's last token again) are accepted wherever the target repeats a token: speculation then
visibly accepts drafts.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from helpers import widen_weights

DEEPSEEK_V3 = dict(vocab_size=160, hidden_size=64, intermediate_size=96,
                   moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                   n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                   first_k_dense_replace=1, n_group=4, topk_group=2, q_lora_rank=24,
                   routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=512,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0)
GLM_45 = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              attention_bias=True, use_qk_norm=True, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=3, first_k_dense_replace=1, routed_scaling_factor=1.0,
              partial_rotary_factor=0.5, max_position_embeddings=512, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {"deepseek-v3": ("DeepseekV3", DEEPSEEK_V3), "glm-4.5": ("Glm4Moe", GLM_45)}


def save_with_mtp(folder: Path, family: str, seed: int = 7, echo: bool = False
                  ) -> tuple[Path, Path]:
    """(the checkpoint with L layers + one MTP layer, the HF folder of L + 1 layers)."""
    import transformers

    prefix, cfg = FAMILIES[family]
    layers = cfg["num_hidden_layers"]
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(getattr(
        transformers, f"{prefix}Config")(**{**cfg, "num_hidden_layers": layers + 1}))
    widen_weights(model)
    full = folder / "hf-full"
    model.save_pretrained(full)
    out = folder / "mtp"
    out.mkdir()
    config = json.loads((full / "config.json").read_text())
    config.update(num_hidden_layers=layers, num_nextn_predict_layers=1)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(full / "model.safetensors")
    h, gen = cfg["hidden_size"], torch.Generator().manual_seed(seed)
    mtp = f"model.layers.{layers}."
    for name in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{mtp}{name}.weight"] = torch.rand(h, generator=gen) + 0.5
    tensors[f"{mtp}eh_proj.weight"] = torch.randn(h, 2 * h, generator=gen) * 0.2
    tensors[f"{mtp}embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"{mtp}shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    if echo:
        _echo(tensors, mtp, h)
    save_file(tensors, out / "model.safetensors")
    return out, full


def _echo(tensors: dict[str, torch.Tensor], mtp: str, h: int) -> None:
    """The MTP layer as `echo` describes (module doc)."""
    g = tensors["model.norm.weight"]
    tensors[f"{mtp}hnorm.weight"], tensors[f"{mtp}shared_head.norm.weight"] = 1 / g, g.clone()
    tensors[f"{mtp}eh_proj.weight"] = torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1)
    for name in list(tensors):
        if name.startswith(mtp) and name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(tensors[name])
