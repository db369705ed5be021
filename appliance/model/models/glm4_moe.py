"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (`Glm4MoeForCausalLM`).

Mirrors HF's modeling_glm4_moe.py: a pre-norm decoder with GQA attention whose q/k/v carry a
bias when `attention_bias` (o_proj never does), optional per-head q/k RMSNorm (`use_qk_norm`)
and NeoX rope on the first `partial_rotary_factor` of each head (0.5 when the config omits it,
as HF's default). The first `first_k_dense_replace` layers have a dense SwiGLU MLP, the others
a DeepSeek-V3-style MoE: sigmoid scores, `e_score_correction_bias` added for the choice only,
group-limited top-k (groups ranked by their top-2 sum), weights renormalised when
`norm_topk_prob` and multiplied by `routed_scaling_factor`, plus `n_shared_experts` shared
experts. The attention / decoder skeleton is the Llama family's, the MoE layers/moe.py's.

Multi-token prediction: the checkpoint's `num_nextn_predict_layers` layers (a decoder layer
with attention + MoE, plus enorm, hnorm, eh_proj, shared_head.norm) are built as `mtp_layers`
and run by `forward_next_token` (appliance/model/mtp.py, shared with DeepSeek-V3), which MTP
speculative decoding drives. GLM-4.5 also stores a copy of the embedding and LM head there
(`embed_tokens`, `shared_head.head`), GLM-4.6 does not; the main model's serve both, so they
are not loaded. A checkpoint saved by transformers (which drops the MTP tensors) still loads:
its MTP layers are left out when it holds no `eh_proj` for them.
"""
from __future__ import annotations

import dataclasses

from appliance.model.context import BuildContext
from appliance.model.layers.moe import DeepseekMoE, MoEConfig
from appliance.model.layers.rotary import rope_params
from appliance.model.models import register_model
from appliance.model.models.llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM
from appliance.model.mtp import NextTokenLayers, mtp_layer_count
from appliance.model.placement import Placed

DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5  # transformers' Glm4MoeConfig, for configs that omit it


def glm4_moe_config(hf: dict) -> MoEConfig:
    """Sigmoid + correction bias, group-limited when n_group > 1, shared experts."""
    n_group = int(hf.get("n_group") or 1)
    return MoEConfig(
        hidden_size=int(hf["hidden_size"]),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        n_routed_experts=int(hf["n_routed_experts"]),
        n_shared_experts=int(hf.get("n_shared_experts") or 0),
        top_k=int(hf["num_experts_per_tok"]), scoring="sigmoid",
        renormalize=bool(hf.get("norm_topk_prob", True)), n_group=n_group,
        topk_group=int(hf.get("topk_group") or n_group),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        correction_bias=True)


def is_moe_layer(hf: dict, layer_idx: int) -> bool:
    return layer_idx >= int(hf.get("first_k_dense_replace") or 0)


@register_model("Glm4MoeForCausalLM")
class Glm4MoeForCausalLM(NextTokenLayers, LlamaForCausalLM):
    def __init__(self, hf_config: dict, ctx: BuildContext) -> None:
        super().__init__(hf_config, ctx)
        moe = glm4_moe_config(hf_config)
        self.build_next_token_layers(hf_config, [
            LlamaDecoderLayer(self.config, self.model.rotary_emb, ctx, DeepseekMoE(moe, ctx))
            for _ in range(mtp_layer_count(hf_config, ctx.checkpoint_tensors))], ctx)

    @classmethod
    def read_config(cls, hf_config: dict) -> LlamaConfig:
        """Llama's flags with o_proj unbiased, q/k norm when use_qk_norm, and GLM's default
        partial rotary factor."""
        cfg = LlamaConfig.from_hf(hf_config, "llama")
        rope = cfg.rope
        if "partial_rotary_factor" not in {**hf_config, **rope_params(hf_config)}:
            if cfg.yarn is not None:   # layers/yarn.py rotates whole heads
                raise ValueError("Glm4MoeForCausalLM: YaRN rope needs partial_rotary_factor 1")
            rope = dataclasses.replace(rope, partial_rotary_factor=DEFAULT_PARTIAL_ROTARY_FACTOR)
        return dataclasses.replace(cfg, o_bias=False, rope=rope,
                                   qk_norm=bool(hf_config.get("use_qk_norm", False)))

    def feed_forward(self, hf_config: dict, layer_idx: int, ctx: BuildContext) -> Placed | None:
        if not is_moe_layer(hf_config, layer_idx):
            return None
        return DeepseekMoE(glm4_moe_config(hf_config), ctx)
