"""RMSNorm and RMSNorm with a fused residual add."""
from __future__ import annotations

from typing import Callable

import torch

from kernels.registry import register


def _rms(x32: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # x32: [T, H] float32 -> [T, H] float32
    inv = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # [T, 1]
    return x32 * inv if weight is None else x32 * inv * weight.float()


@register("rms_norm", backend="torch", priority=0)
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [T, H], weight: [H] or None (a unit scale) -> [T, H] in x.dtype."""
    return _rms(x.float(), weight, eps).to(x.dtype)


@register("fused_add_rms_norm", backend="torch", priority=0)
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is rounded to x.dtype first,
    as an unfused model (HF) would store it."""
    s = (x.float() + residual.float()).to(x.dtype)  # [T, H]
    return _rms(s.float(), weight, eps).to(x.dtype), s


def pre_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
             eps: float, norm: Callable = rms_norm, add_norm: Callable = fused_add_rms_norm
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm layer's (normed, new residual): add_norm(x, residual, weight, eps), or
    (norm(x, weight, eps), x) for the first layer's (residual None); `norm` and `add_norm`
    are a backend's ops (these by default)."""
    if residual is None:
        return norm(x, weight, eps), x
    return add_norm(x, residual, weight, eps)

