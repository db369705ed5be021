"""YaRN rope scaling (rope_type "yarn"), as HF transformers computes it: DeepSeek V2/V3
checkpoints, and Llama/Qwen configs that extend their context with a `rope_scaling` of type
yarn (Qwen2.5 past 32K).

High rotary frequencies are kept, low ones divided by `factor`, the band between blended by a
linear ramp; cos and sin are multiplied by the attention factor. `context_length(hf)` is the
longest position a config serves: YaRN configs that keep the pretraining
`max_position_embeddings` (Qwen2.5) serve original x factor, as vLLM does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from appliance.model.layers.rotary import RopeConfig, RotaryEmbedding, rope_params


@dataclass(frozen=True)
class YarnConfig:
    """YaRN rope scaling (rope_type "yarn")."""

    theta: float
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


def yarn_config(hf: dict) -> YarnConfig | None:
    """The YaRN settings of an HF config, or None when its rope is not YaRN."""
    p = rope_params(hf)
    if p.get("rope_type", p.get("type", "default")) != "yarn":
        return None
    if float(p.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("YaRN with partial_rotary_factor != 1 is not supported")
    orig = int(p.get("original_max_position_embeddings") or hf["max_position_embeddings"])
    factor = p.get("factor")
    factor = float(factor) if factor is not None else hf["max_position_embeddings"] / orig
    att = p.get("attention_factor")
    return YarnConfig(
        theta=float(p["rope_theta"]), factor=factor, original_max_position_embeddings=orig,
        beta_fast=float(p.get("beta_fast") or 32), beta_slow=float(p.get("beta_slow") or 1),
        mscale=float(p.get("mscale") or 0.0), mscale_all_dim=float(p.get("mscale_all_dim") or 0.0),
        attention_factor=float(att) if att is not None else None,
        truncate=bool(p.get("truncate", True)))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(y: YarnConfig) -> float:
    """The factor cos/sin are multiplied by."""
    if y.attention_factor is not None:
        return y.attention_factor
    if y.mscale and y.mscale_all_dim:
        return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    return yarn_mscale(y.factor)


def yarn_inv_frequencies(y: YarnConfig, rotary_dim: int) -> torch.Tensor:
    """[R/2] float32: high frequencies kept (extrapolation), low ones divided by `factor`
    (interpolation), blended by a linear ramp over the dims between the rotation counts
    beta_fast and beta_slow within the original context."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim  # [R/2]
    extrapolated = 1.0 / y.theta ** exponents                                      # [R/2]
    interpolated = extrapolated / y.factor                                         # [R/2]

    def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times in context
        return (rotary_dim * math.log(y.original_max_position_embeddings
                                      / (rotations * 2 * math.pi))) / (2 * math.log(y.theta))

    low, high = dim_of(y.beta_fast), dim_of(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp                                                              # [R/2]
    return interpolated * (1.0 - keep) + extrapolated * keep


class YarnRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose cos|sin table follows YaRN (cos and sin scaled by the attention
    factor). Same kernel and call as the base class."""

    def __init__(self, rotary_dim: int, max_positions: int, yarn: YarnConfig,
                 device: torch.device | str, dtype: torch.dtype, is_neox: bool) -> None:
        super().__init__(rotary_dim, max_positions, RopeConfig(theta=yarn.theta), device, dtype,
                         is_neox)
        self.yarn = yarn

    def init_buffers(self, device: torch.device) -> None:
        inv = yarn_inv_frequencies(self.yarn, self.rotary_dim).to(device)           # [R/2]
        pos = torch.arange(self.max_positions, device=device, dtype=torch.int64).float()
        freqs = torch.outer(pos, inv)                                                # [P, R/2]
        m = yarn_attention_factor(self.yarn)
        self.cos_sin = torch.cat([freqs.cos() * m, freqs.sin() * m], dim=-1)         # [P, R]


def context_length(hf: dict) -> int:
    """max_position_embeddings, or original_max_position_embeddings x factor under YaRN when
    that is longer."""
    base = int(hf.get("max_position_embeddings", 4096))
    y = yarn_config(hf)
    if y is None:
        return base
    return max(base, int(y.original_max_position_embeddings * y.factor))
