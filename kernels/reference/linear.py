"""x @ W.T + b: torch's own (cuBLAS on a GPU); the CPU backend (kernels/cpu) tunes small M.
And the same followed by silu_and_mul (a SwiGLU MLP's gate|up projection)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference.activation import silu_and_mul
from kernels.registry import register


@register("linear", backend="torch", priority=0)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x: [M, K], weight: [N, K], bias: [N] or None -> [M, N]."""
    return F.linear(x, weight, bias)


@register("linear_silu_and_mul", backend="torch", priority=0)
def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(linear(x, weight, bias)): weight [2I, K] is I gate rows then I up rows,
    bias [2I] or None -> [M, I] (a SwiGLU MLP's gate|up projection and its activation)."""
    return silu_and_mul(F.linear(x, weight, bias))
