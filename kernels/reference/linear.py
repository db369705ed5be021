"""x @ W.T + b: torch's own (cuBLAS on a GPU); the CPU backend (kernels/cpu) tunes small M."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.registry import register


@register("linear", backend="torch", priority=0)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x: [M, K], weight: [N, K], bias: [N] or None -> [M, N]."""
    return F.linear(x, weight, bias)
