"""GPT-OSS (gpt-oss-20b / gpt-oss-120b): `GptOssForCausalLM`.

Mirrors HF's modeling_gpt_oss.py: a pre-norm decoder whose layers alternate sliding-window
(`sliding_window`, 128) and full attention (`layer_types`), each attention with q/k/v/o
biases, YaRN rope (NeoX halves) and a learned sink logit per head; the feed-forward is a
mixture of experts with a biased router and biased experts with a clamped SwiGLU
(layers/gpt_oss_moe.py). The decoder skeleton (norm -> attention -> norm -> MoE with fused
residual adds, `placement_chain`) and the causal-LM wrapper are the Llama family's.

Placements as Llama's: embedding / LM head vocab-parallel, attention heads (and their sinks)
over "attn_tp", experts over "moe_tp" (or "moe_ep"); the placement compiler inserts the
collectives. Checkpoint names are HF's (`self_attn.sinks`, `mlp.router.{weight,bias}`,
`mlp.experts.{gate_up_proj,down_proj}[_bias]`); MXFP4 checkpoints load through the loader.
"""
from __future__ import annotations

from torch import nn

from appliance.model.context import BuildContext
from appliance.model.layers.attention import PagedAttention
from appliance.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from appliance.model.layers.gpt_oss_moe import GptOssMoE, GptOssMoEConfig
from appliance.model.layers.norm import RMSNorm
from appliance.model.layers.rotary import RotaryEmbedding
from appliance.model.layers.yarn import YarnRotaryEmbedding
from appliance.model.models import register_model
from appliance.model.models.llama import (LlamaAttention, LlamaConfig, LlamaDecoderLayer,
                                          LlamaForCausalLM, LlamaModel)

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_windows(hf: dict) -> list[int]:
    """The attention window of each layer: `sliding_window` for sliding layers, 0 (all keys)
    for full ones. Without `layer_types`, even layers slide (HF's default)."""
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(n)]
    if len(types) != n or set(types) - {SLIDING, FULL}:
        raise ValueError(f"layer_types must list {n} of {SLIDING!r} / {FULL!r}, got {types}")
    window = int(hf.get("sliding_window") or 0)
    if SLIDING in types and window <= 0:
        raise ValueError("sliding_attention layers need a positive sliding_window")
    return [window if t == SLIDING else 0 for t in types]


class GptOssAttention(LlamaAttention):
    """Llama's attention (q/k/v/o biased) whose PagedAttention has sinks and, on sliding
    layers, a window."""

    def __init__(self, cfg: LlamaConfig, rotary_emb: RotaryEmbedding, ctx: BuildContext,
                 window: int) -> None:
        super().__init__(cfg, rotary_emb, ctx)
        d = self.head_dim
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, d ** -0.5, ctx,
                                   window=window, sinks=True)


class GptOssDecoderLayer(LlamaDecoderLayer):
    """input_layernorm -> self_attn -> post_attention_layernorm -> mlp (MoE); `forward` and
    `placement_chain` are the shared pre-norm skeleton's."""

    def __init__(self, cfg: LlamaConfig, moe: GptOssMoEConfig, window: int,
                 rotary_emb: RotaryEmbedding, ctx: BuildContext) -> None:
        nn.Module.__init__(self)  # the skeleton's four modules are GPT-OSS's, built here
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, ctx.device, ctx.dtype)
        self.self_attn = GptOssAttention(cfg, rotary_emb, ctx, window)
        self.post_attention_layernorm = RMSNorm(h, eps, ctx.device, ctx.dtype)
        self.mlp = GptOssMoE(moe, ctx)


class GptOssModel(LlamaModel):
    """embed_tokens -> layers -> (norm, applied by the causal LM on the last tokens)."""

    def __init__(self, hf: dict, cfg: LlamaConfig, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        if cfg.yarn is None:
            raise ValueError("GPT-OSS configs use YaRN rope (rope_scaling / rope_parameters "
                             "with rope_type 'yarn')")
        moe = GptOssMoEConfig.from_hf(hf)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx.layout)
        self.rotary_emb = YarnRotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings,
                                              cfg.yarn, ctx.device, ctx.dtype, is_neox=True)
        self.layers = nn.ModuleList(GptOssDecoderLayer(cfg, moe, w, self.rotary_emb, ctx)
                                    for w in layer_windows(hf))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.device, ctx.dtype)


@register_model("GptOssForCausalLM")
class GptOssForCausalLM(LlamaForCausalLM):
    """model + lm_head; `placement_chain` and `forward` are the shared causal-LM wrapper's."""

    def __init__(self, hf_config: dict, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        self.config = LlamaConfig.from_hf(hf_config, "llama")  # attention_bias: q/k/v/o
        self.model = GptOssModel(hf_config, self.config, ctx)
        self.lm_head = ParallelLMHead(
            self.config.vocab_size, self.config.hidden_size, ctx.layout,
            tied_to=self.model.embed_tokens if self.config.tie_word_embeddings else None)
