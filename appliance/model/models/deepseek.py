"""The DeepSeek family: DeepSeek-V2 / V2-Lite and DeepSeek-V3 (the Kimi K2 / K2.5 text model).

Mirrors HF's modeling_deepseek_v2.py / modeling_deepseek_v3.py: a pre-norm decoder whose
attention is MLA (layers/mla.py) and whose feed-forward is a dense SwiGLU MLP for the first
`first_k_dense_replace` layers and DeepSeekMoE (layers/moe.py) after them. The decoder
skeleton (norm -> attention -> norm -> MLP with fused residual adds, `placement_chain`) and
the causal-LM wrapper are the Llama family's; only the blocks differ. Placements:
embedding / LM head vocab-parallel, MLA heads over "attn_tp", dense MLP over "dense_tp",
experts over "moe_tp" (and "moe_ep"); the placement compiler inserts the collectives.

Checkpoint names are HF's, so the loader maps them directly, except the routed experts:
`mlp.experts.{e}.{gate,up,down}_proj.weight` are stacked into `mlp.experts.w13` / `w2`.
V3's multi-token-prediction layers (`model.layers.{num_hidden_layers + i}.*`: an MLA + MoE
decoder layer with enorm, hnorm, eh_proj, shared_head.norm) are built as `mtp_layers` and run
by `forward_next_token` (appliance/model/mtp.py) for MTP speculative decoding; a checkpoint
without them (transformers saves none) builds none.

V2 vs V3: V2 routes with softmax scores (greedy or group-limited greedy, groups ranked by
their best expert) and always rotates interleaved rope pairs; V3 routes with sigmoid scores
+ e_score_correction_bias (groups ranked by their top-2 sum), renormalises, and rotates
interleaved pairs unless `rope_interleave` is false.
"""
from __future__ import annotations

from torch import nn

from appliance.model.context import BuildContext
from appliance.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from appliance.model.layers.mla import MLAConfig, MLAttention, mla_rotary
from appliance.model.layers.mlp import SwiGLUMLP
from appliance.model.layers.moe import DeepseekMoE, MoEConfig, is_moe_layer
from appliance.model.layers.norm import RMSNorm
from appliance.model.layers.rotary import RotaryEmbedding
from appliance.model.models import register_model
from appliance.model.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from appliance.model.mtp import NextTokenLayers, mtp_layer_count


class DeepseekDecoderLayer(LlamaDecoderLayer):
    """input_layernorm -> self_attn (MLA) -> post_attention_layernorm -> mlp (dense or MoE);
    `forward` and `placement_chain` are the shared pre-norm skeleton's."""

    def __init__(self, hf: dict, layer_idx: int, mla: MLAConfig, moe: MoEConfig | None,
                 rotary_emb: RotaryEmbedding, ctx: BuildContext) -> None:
        nn.Module.__init__(self)  # the skeleton's four modules are DeepSeek's, built here
        hidden, eps = int(hf["hidden_size"]), float(hf.get("rms_norm_eps", 1e-6))
        self.input_layernorm = RMSNorm(hidden, eps, ctx.device, ctx.dtype)
        self.self_attn = MLAttention(mla, rotary_emb, ctx)
        self.post_attention_layernorm = RMSNorm(hidden, eps, ctx.device, ctx.dtype)
        if moe is not None and is_moe_layer(hf, layer_idx):
            self.mlp = DeepseekMoE(moe, ctx)
        else:
            self.mlp = SwiGLUMLP(hidden, int(hf["intermediate_size"]), ctx,
                                 bool(hf.get("mlp_bias", False)))


class DeepseekModel(LlamaModel):
    """embed_tokens -> layers -> (norm, applied by the causal LM on the last tokens)."""

    def __init__(self, hf: dict, version: int, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        vocab, hidden = int(hf["vocab_size"]), int(hf["hidden_size"])
        # V2 always rotates interleaved pairs; V3 unless rope_interleave is false
        mla = MLAConfig.from_hf(hf, rope_is_neox=version == 3 and
                                hf.get("rope_interleave", True) is False)
        moe = MoEConfig.from_hf(hf, version) if hf.get("n_routed_experts") else None
        self.mla, self.moe = mla, moe
        self.embed_tokens = VocabParallelEmbedding(vocab, hidden, ctx.layout)
        self.rotary_emb = mla_rotary(mla, ctx)
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(hf, i, mla, moe, self.rotary_emb, ctx)
            for i in range(int(hf["num_hidden_layers"])))
        self.norm = RMSNorm(hidden, float(hf.get("rms_norm_eps", 1e-6)), ctx.device, ctx.dtype)


class DeepseekForCausalLM(NextTokenLayers, LlamaForCausalLM):
    """model + lm_head (+ MTP layers); `placement_chain` and `forward` (logits of each row's
    last token) are the shared causal-LM wrapper's."""

    version = 2

    def __init__(self, hf_config: dict, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        self.hf_config = hf_config
        self.model = DeepseekModel(hf_config, self.version, ctx)
        vocab, hidden = int(hf_config["vocab_size"]), int(hf_config["hidden_size"])
        tied = bool(hf_config.get("tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(vocab, hidden, ctx.layout,
                                      tied_to=self.model.embed_tokens if tied else None)
        first, m = int(hf_config["num_hidden_layers"]), self.model
        self.build_next_token_layers(hf_config, [
            DeepseekDecoderLayer(hf_config, first + i, m.mla, m.moe, m.rotary_emb, ctx)
            for i in range(mtp_layer_count(hf_config, ctx.checkpoint_tensors))], ctx)


@register_model("DeepseekV2ForCausalLM")
class DeepseekV2ForCausalLM(DeepseekForCausalLM):
    version = 2


@register_model("DeepseekV3ForCausalLM")
class DeepseekV3ForCausalLM(DeepseekForCausalLM):
    version = 3
