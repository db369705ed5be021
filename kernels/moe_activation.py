"""The clamped SwiGLU of GPT-OSS's experts, an option of the `fused_moe` op.

    gate' = min(gate, limit),  up' = clamp(up, -limit, limit)
    y     = (up' + 1) * gate' * sigmoid(alpha * gate')

(HF transformers' GptOssExperts._apply_gate). The default `fused_moe` activation, without
this option, is silu(gate) * up.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClampedSwiGLU:
    alpha: float = 1.702
    limit: float = 7.0
