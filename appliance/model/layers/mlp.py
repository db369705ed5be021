"""SwiGLU MLP: down(silu(gate(x)) * up(x)), gate|up column-parallel, down row-parallel.

On the chain: input Replicate, output Partial over its group ("dense_tp" for dense layers;
a MoE's shared experts may use it over "moe_tp").
"""
from __future__ import annotations

import torch

import kernels
from appliance.model.context import BuildContext
from appliance.model.layers.linear import ColumnParallelLinear, Part, RowParallelLinear
from appliance.model.layers.norm import RMSNorm
from appliance.model.placement import Partial, Placed, Replicate


class SwiGLUMLP(Placed):
    def __init__(self, hidden_size: int, intermediate_size: int, ctx: BuildContext,
                 bias: bool = False, group: str = "dense_tp") -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [Part("gate_proj", intermediate_size), Part("up_proj", intermediate_size)],
            bias, ctx.layout, group)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, ctx.layout, group)
        # gate|up and the activation in one op (batch-1 decode: one GEMV launch, not two)
        self.gate_up_act = kernels.select("linear_silu_and_mul", device=ctx.device,
                                          dtype=ctx.dtype)
        self.input_placement, self.output_placement = Replicate(group), Partial(group)
        self.folds_norm = True  # forward_normed: the norm inside gate|up's op
        self.fold_kind = "mlp"  # folds by default if in norm.FOLDED_KINDS

    @property
    def scale_target(self) -> ColumnParallelLinear:
        """What takes the norm's scale (norm.SCALED_KINDS): gate|up."""
        return self.gate_up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, H] (partial sums over the group)
        gate_up = self.gate_up_proj
        act = self.gate_up_act(x, gate_up.weight, gate_up.bias)   # [T, I_local]
        return self.down_proj(act)                                # [T, H]

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward over norm(x, residual), the norm inside gate|up's op -> (out, residual)."""
        act, residual = norm.into(self.gate_up_proj, x, residual, silu_mul=True)
        return self.down_proj(act), residual
