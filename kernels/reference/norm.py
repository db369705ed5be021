"""RMSNorm, RMSNorm with a fused residual add, and both followed by a linear layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.registry import register


def _rms(x32: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x32: [T, H] float32 -> [T, H] float32
    inv = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # [T, 1]
    return x32 * inv * weight.float()


@register("rms_norm", backend="torch", priority=0)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H], weight: [H] -> [T, H] in x.dtype."""
    return _rms(x.float(), weight, eps).to(x.dtype)


@register("fused_add_rms_norm", backend="torch", priority=0)
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is rounded to x.dtype first,
    as an unfused model (HF) would store it."""
    s = (x.float() + residual.float()).to(x.dtype)  # [T, H]
    return _rms(s.float(), weight, eps).to(x.dtype), s


@register("add_rms_norm_linear", backend="torch", priority=0)
def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                        eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        silu_and_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual)), x + residual) with residual [T, H]; residual None:
    (linear(rms_norm(x)), x). The sum is rounded to x.dtype (as fused_add_rms_norm's); the
    normed rows and the product are not, as a kernel that keeps them in float32 does not.
    silu_and_mul: the product [T, 2I] (gate, up) becomes silu(gate) * up [T, I].
    x: [T, H], norm_weight: [H], weight: [N, H], bias: [N] -> ([T, N or N/2], [T, H])."""
    s = x if residual is None else (x.float() + residual.float()).to(x.dtype)   # [T, H]
    normed = _rms(s.float(), norm_weight, eps)                                   # [T, H] f32
    y = F.linear(normed, weight.float(), bias.float() if bias is not None else None)
    if silu_and_mul:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y.to(x.dtype), s
