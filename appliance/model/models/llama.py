"""The Llama family: Llama-3.x, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Mirrors HF's modeling_llama.py: Attention / MLP / DecoderLayer / Model / ForCausalLM, with
GQA, RoPE (default, linear or Llama-3.1 scaling), RMSNorm, SwiGLU and tied or untied
embeddings. Every module is built for this rank's shard (see placement.py); the collectives
between them are inserted by the placement compiler from `placement_chain()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from appliance.model.batch import ForwardBatch
from appliance.model.context import BuildContext
from appliance.model.layers.attention import PagedAttention
from appliance.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from appliance.model.layers.linear import ColumnParallelLinear, Part, RowParallelLinear
from appliance.model.layers.mlp import SwiGLUMLP
from appliance.model.layers.norm import HeadRMSNorm, RMSNorm
from appliance.model.layers.rotary import RopeConfig, RotaryEmbedding, rope_config
from appliance.model.layers.yarn import (YarnConfig, YarnRotaryEmbedding, context_length,
                                         yarn_config)
from appliance.model.models import register_model
from appliance.model.placement import Partial, Placed, Replicate


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    yarn: YarnConfig | None = None   # YaRN rope (layers/yarn.py); then `rope` holds only theta

    @staticmethod
    def from_hf(hf: dict, family: str = "llama") -> "LlamaConfig":
        """family: "llama" (attention_bias on q/k/v/o), "qwen2" (bias on q/k/v), "qwen3"
        (q/k norm, attention_bias on q/k/v/o)."""
        heads = int(hf["num_attention_heads"])
        attn_bias = bool(hf.get("attention_bias", False))
        yarn = yarn_config(hf)
        return LlamaConfig(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=context_length(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=rope_config(hf) if yarn is None else RopeConfig(theta=yarn.theta),
            qkv_bias=True if family == "qwen2" else attn_bias,
            o_bias=False if family == "qwen2" else attn_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=family == "qwen3", yarn=yarn)


class LlamaAttention(Placed):
    def __init__(self, cfg: LlamaConfig, rotary_emb: RotaryEmbedding, ctx: BuildContext) -> None:
        super().__init__()
        tp = ctx.layout.size("attn_tp")
        if cfg.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads {cfg.num_attention_heads} is not divisible by "
                             f"tp_size {tp}")
        d = cfg.head_dim
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, [Part("q_proj", cfg.num_attention_heads * d, d),
                              Part("k_proj", cfg.num_key_value_heads * d, d),
                              Part("v_proj", cfg.num_key_value_heads * d, d)],
            cfg.qkv_bias, ctx.layout, "attn_tp")
        self.q_size, self.kv_size, _ = self.qkv_proj.local_sizes
        self.num_heads, self.num_kv_heads, self.head_dim = self.q_size // d, self.kv_size // d, d
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, cfg.o_bias,
                                        ctx.layout, "attn_tp", unit=d)
        if cfg.qk_norm:
            self.q_norm = HeadRMSNorm(d, cfg.rms_norm_eps, ctx.device, ctx.dtype, "attn_tp")
            self.k_norm = HeadRMSNorm(d, cfg.rms_norm_eps, ctx.device, ctx.dtype, "attn_tp")
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = rotary_emb
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, d ** -0.5, ctx)
        self.input_placement, self.output_placement = Replicate("attn_tp"), Partial("attn_tp")
        self.folds_norm = True  # forward_normed: the norm inside q|k|v's op
        self.fold_kind = "attention"  # folds by default if in norm.FOLDED_KINDS

    @property
    def scale_target(self) -> ColumnParallelLinear:
        """What takes the input norm's scale (norm.SCALED_KINDS): q|k|v."""
        return self.qkv_proj

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        # positions: [T]; hidden_states: [T, H] -> [T, H] (partial sums over attn_tp)
        return self._attend(positions, self.qkv_proj(hidden_states), batch)

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None,
                       positions: torch.Tensor, batch: ForwardBatch
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward over norm(x, residual), the norm inside q|k|v's op -> (out, residual)."""
        qkv, residual = norm.into(self.qkv_proj, x, residual)
        return self._attend(positions, qkv, batch), residual

    def _attend(self, positions: torch.Tensor, qkv: torch.Tensor, batch: ForwardBatch
                ) -> torch.Tensor:
        # qkv: [T, (Hq + 2 Hk) * D] -> [T, H] (partial sums over attn_tp)
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)            # [T, Hq, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)         # [T, Hk, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)         # [T, Hk, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(q, k, v, batch, positions, self.rotary_emb)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    """mlp: the layer's feed-forward (a MoE, ...); None for the dense SwiGLU MLP."""

    def __init__(self, cfg: LlamaConfig, rotary_emb: RotaryEmbedding, ctx: BuildContext,
                 mlp: Placed | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.device, ctx.dtype)
        self.self_attn = LlamaAttention(cfg, rotary_emb, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.device,
                                                ctx.dtype)
        self.mlp = mlp if mlp is not None else SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size,
                                                         ctx, cfg.mlp_bias)

    def placement_chain(self, prefix: str) -> Iterator[tuple[str, Placed]]:
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            yield f"{prefix}.{name}", getattr(self, name)

    def norm_consumers(self) -> Iterator[tuple[RMSNorm, nn.Module]]:
        """Each norm and the module that reads its output (norm.plan_scale_folds)."""
        yield self.input_layernorm, self.self_attn
        yield self.post_attention_layernorm, self.mlp

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, batch: ForwardBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden_states, residual: [T, H] -> (mlp output [T, H], residual [T, H]); each norm
        # inside its consumer's first linear where that one folds it (layers/norm.py)
        norm, attn = self.input_layernorm, self.self_attn
        if norm.folds_into(attn):
            hidden_states, residual = attn.forward_normed(norm, hidden_states, residual,
                                                          positions, batch)
        else:
            hidden_states, residual = norm(hidden_states, residual)
            hidden_states = attn(positions, hidden_states, batch)
        norm, mlp = self.post_attention_layernorm, self.mlp
        if norm.folds_into(mlp):
            hidden_states, residual = mlp.forward_normed(norm, hidden_states, residual)
        else:
            hidden_states, residual = norm(hidden_states, residual)
            hidden_states = mlp(hidden_states)
        return hidden_states, residual


FeedForward = Callable[[int], Placed | None]  # layer index -> its MLP; None: the dense one


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, ctx: BuildContext,
                 feed_forward: FeedForward = lambda layer_idx: None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx.layout)
        self.rotary_emb = (
            RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope, ctx.device,
                            ctx.dtype) if cfg.yarn is None else
            YarnRotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.yarn, ctx.device,
                                ctx.dtype, is_neox=True))
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rotary_emb, ctx, feed_forward(i))
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.device, ctx.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # input_ids, positions: [T] -> (last layer's output [T, H], residual [T, H])
        hidden_states = self.embed_tokens(input_ids)            # [T, H]
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, batch)
        return hidden_states, residual


class LlamaForCausalLM(nn.Module):
    """Subclasses change the attention flags (`read_config`) or a layer's feed-forward
    (`feed_forward`), e.g. models/qwen3_moe.py and models/glm4_moe.py."""

    family = "llama"

    def __init__(self, hf_config: dict, ctx: BuildContext) -> None:
        super().__init__()
        self.config = self.read_config(hf_config)
        self.model = LlamaModel(self.config, ctx,
                                lambda layer_idx: self.feed_forward(hf_config, layer_idx, ctx))
        self.lm_head = ParallelLMHead(
            self.config.vocab_size, self.config.hidden_size, ctx.layout,
            tied_to=self.model.embed_tokens if self.config.tie_word_embeddings else None)

    @classmethod
    def read_config(cls, hf_config: dict) -> LlamaConfig:
        return LlamaConfig.from_hf(hf_config, cls.family)

    def feed_forward(self, hf_config: dict, layer_idx: int, ctx: BuildContext) -> Placed | None:
        """Layer `layer_idx`'s MLP; None: the dense SwiGLU MLP."""
        return None

    def placement_chain(self) -> Iterator[tuple[str, Placed]]:
        """The Placed modules in the order forward() runs them on the hidden state."""
        yield "model.embed_tokens", self.model.embed_tokens
        for i, layer in enumerate(self.model.layers):
            yield from layer.placement_chain(f"model.layers.{i}")
        yield "model.norm", self.model.norm
        yield "lm_head", self.lm_head

    def norm_consumers(self) -> Iterator[tuple[RMSNorm, nn.Module]]:
        """The final norm and the head (the layers name theirs; norm.plan_scale_folds)."""
        yield self.model.norm, self.lm_head

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        # -> logits [N, V_local or V] of the batch's logit tokens (each row's last token, or
        # every token of a verify row); the compiler gathers vocab
        hidden_states, residual = self.model(batch.input_ids, batch.positions, batch)
        hidden_states = batch.at_logit_tokens(hidden_states)                   # [N, H]
        residual = batch.at_logit_tokens(residual)                             # [N, H]
        if self.model.norm.folds_into(self.lm_head):
            return self.lm_head.forward_normed(self.model.norm, hidden_states, residual)[0]
        hidden_states, _ = self.model.norm(hidden_states, residual)
        return self.lm_head(hidden_states)


@register_model("Qwen2ForCausalLM")
class Qwen2ForCausalLM(LlamaForCausalLM):
    family = "qwen2"


@register_model("Qwen3ForCausalLM")
class Qwen3ForCausalLM(LlamaForCausalLM):
    family = "qwen3"


register_model("LlamaForCausalLM", "MistralForCausalLM")(LlamaForCausalLM)
