"""x @ W.T + b: torch's own (cuBLAS on a GPU); the CPU backend (kernels/cpu) tunes small M.
And the same followed by silu_and_mul (a SwiGLU MLP's gate|up projection); and each head's
tokens by that head's own matrix (`head_matmul`: MLA's absorbed W_UK / W_UV products); and a
pre-norm layer's RMSNorm followed by its first linear (`rms_norm_linear`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference.activation import silu_and_mul
from kernels.reference.norm import pre_norm
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


@register("head_matmul", backend="torch", priority=0)
def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [T, H, K], weight: [H, K, N] (any strides) -> [T, H, N]: out[t, h] = x[t, h] @
    weight[h] (torch.einsum: one batched GEMM over the heads)."""
    return torch.einsum("thk,hkn->thn", x, weight)


@register("rms_norm_linear", backend="torch", priority=0)
def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None,
                    norm_weight: torch.Tensor | None, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, silu_mul: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm layer's RMSNorm and the first linear that reads it: (normed, new residual)
    = fused_add_rms_norm(x, residual, norm_weight, eps) (rms_norm(x) and x when residual is
    None), then (linear(normed, weight, bias) or with silu_mul linear_silu_and_mul's, new
    residual). x, residual: [M, K] -> ([M, N] or [M, N / 2], [M, K]). norm_weight None: a
    unit scale (the norm's own went into `weight`'s columns)."""
    normed, residual = pre_norm(x, residual, norm_weight, eps)
    project = linear_silu_and_mul if silu_mul else linear
    return project(normed, weight, bias), residual


