"""Qwen3-MoE: Qwen3-Coder-30B-A3B, Qwen3-Coder-480B-A35B, Qwen3-30B-A3B / 235B-A22B.

Mirrors HF's modeling_qwen3_moe.py: Qwen3's attention (GQA, per-head q/k RMSNorm, no bias
unless `attention_bias`) and a sparse MoE block in place of the MLP on every layer that is
not in `mlp_only_layers` and whose index + 1 is a multiple of `decoder_sparse_step`; the others
keep the dense SwiGLU MLP of `intermediate_size`. The MoE routes with softmax scores over all
experts, keeps the top `num_experts_per_tok` and, with `norm_topk_prob`, renormalises their
weights; there is no shared expert, no group limit and no scaling factor.

Everything but the feed-forward is the Llama family's (models/llama.py, family "qwen3"); the
MoE block is layers/moe.py's, so the experts split over "moe_tp" or, with `parallel.moe: ep`,
whole experts over "moe_ep". Checkpoint names are HF's: `mlp.gate.weight` and
`mlp.experts.{e}.{gate,up,down}_proj.weight`, stacked at load.
"""
from __future__ import annotations

from appliance.model.context import BuildContext
from appliance.model.layers.moe import DeepseekMoE, MoEConfig
from appliance.model.models import register_model
from appliance.model.models.llama import LlamaConfig, LlamaForCausalLM
from appliance.model.placement import Placed


def num_experts(hf: dict) -> int:
    """config.json spells it `num_experts`; transformers 5 saves `num_local_experts`."""
    return int(hf.get("num_experts") or hf.get("num_local_experts") or 0)


def is_sparse_layer(hf: dict, layer_idx: int) -> bool:
    """HF's rule: MoE unless listed in mlp_only_layers, on every decoder_sparse_step-th layer."""
    if layer_idx in (hf.get("mlp_only_layers") or []) or num_experts(hf) == 0:
        return False
    return (layer_idx + 1) % int(hf.get("decoder_sparse_step") or 1) == 0


def qwen3_moe_config(hf: dict) -> MoEConfig:
    """Softmax top-k over all experts, renormalised when norm_topk_prob; no shared expert."""
    return MoEConfig(
        hidden_size=int(hf["hidden_size"]),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        n_routed_experts=num_experts(hf), n_shared_experts=0,
        top_k=int(hf["num_experts_per_tok"]), scoring="softmax",
        renormalize=bool(hf.get("norm_topk_prob", False)), n_group=1, topk_group=1,
        routed_scaling_factor=1.0, correction_bias=False)


@register_model("Qwen3MoeForCausalLM")
class Qwen3MoeForCausalLM(LlamaForCausalLM):
    family = "qwen3"

    @classmethod
    def read_config(cls, hf_config: dict) -> LlamaConfig:
        if hf_config.get("use_sliding_window") and hf_config.get("sliding_window"):
            raise ValueError("Qwen3MoeForCausalLM: use_sliding_window is not supported (every "
                             "released Qwen3-MoE checkpoint attends to the full context)")
        return super().read_config(hf_config)

    def feed_forward(self, hf_config: dict, layer_idx: int, ctx: BuildContext) -> Placed | None:
        if not is_sparse_layer(hf_config, layer_idx):
            return None
        return DeepseekMoE(qwen3_moe_config(hf_config), ctx)
