"""RMSNorm on the hidden-state chain, optionally with the residual add fused in.

`RMSNorm(x, residual)` returns `(rms_norm(x + residual), x + residual)` (or
`(rms_norm(x), x)` when residual is None, the first layer). Its input must be Replicate;
when the producer's output is Partial the compiler hands it a fused all-reduce step
(`set_fused_reduce`) and the norm runs that step instead of the plain kernels.
`HeadRMSNorm` normalises each attention head (Qwen3's q_norm / k_norm); it is not on the
chain.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import kernels
from appliance.model.placement import Placed, Replicate, WeightSharding, WeightSource


class _NormWeight(nn.Module):
    def __init__(self, hidden_size: int, eps: float, device: torch.device | str,
                 dtype: torch.dtype, group: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps, self.group = eps, group
        self.rms_norm = kernels.select("rms_norm", device=device, dtype=dtype)

    def weight_shardings(self, prefix: str) -> list[WeightSharding]:
        return [WeightSharding(f"{prefix}.weight", "replicated", self.group,
                               (WeightSource(f"{prefix}.weight", tuple(self.weight.shape)),))]


class RMSNorm(_NormWeight, Placed):
    fuses_input_reduce = True

    def __init__(self, hidden_size: int, eps: float, device: torch.device | str,
                 dtype: torch.dtype, group: str = "attn_tp") -> None:
        super().__init__(hidden_size, eps, device, dtype, group)
        self.fused_add_rms_norm = kernels.select("fused_add_rms_norm", device=device, dtype=dtype)
        self.input_placement = self.output_placement = Replicate(group)
        self.fused_reduce: Callable | None = None

    def set_fused_reduce(self, step: Callable) -> None:
        self.fused_reduce = step

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, H], residual: [T, H] | None -> (normed [T, H], new residual [T, H])
        if self.fused_reduce is not None:
            return self.fused_reduce(x, residual, self.weight, self.eps, self.rms_norm,
                                     self.fused_add_rms_norm)
        if residual is None:
            return self.rms_norm(x, self.weight, self.eps), x
        return self.fused_add_rms_norm(x, residual, self.weight, self.eps)


class HeadRMSNorm(_NormWeight):
    """RMSNorm over the last dim of [T, heads, head_dim] (weight [head_dim])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, Hn, D] -> [T, Hn, D]
        t, h, d = x.shape
        return self.rms_norm(x.reshape(t * h, d), self.weight, self.eps).view(t, h, d)
