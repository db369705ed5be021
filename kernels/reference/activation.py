"""SiLU-and-mul (SwiGLU activation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.registry import register


@register("silu_and_mul", backend="torch", priority=0)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] -> silu(x[:, :I]) * x[:, I:]  [T, I]."""
    i = x.shape[-1] // 2
    x32 = x.float()
    return (F.silu(x32[..., :i]) * x32[..., i:]).to(x.dtype)
