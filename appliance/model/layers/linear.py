"""Linear layers that know how their weights shard.

- `ColumnParallelLinear`: weight [out, in] split along out (checkpoint dim 0); input
  Replicate, output Shard(-1). Several checkpoint tensors may be fused into one
  (q|k|v, gate|up), each split on its own, whole units (heads) at a time.
- `RowParallelLinear`: weight split along in (checkpoint dim 1); input Shard(-1), output
  Partial. The bias is added on group rank 0 only, so the pending sum counts it once.
- `ReplicatedLinear`: the whole weight on every rank.

Parameters are created empty; the loader fills them from the `weight_shardings` they declare.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import kernels

from appliance.model.placement import (ParallelLayout, Partial, Replicate, Shard, WeightSharding,
                                       WeightSource, split_extent)


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor of a (possibly fused) linear: its name relative to the parent
    module ("q_proj"), its full output size and the unit it is split in (head_dim)."""

    name: str
    out_features: int
    unit: int = 1


def _parent(prefix: str) -> str:
    return prefix.rsplit(".", 1)[0] + "." if "." in prefix else ""


class RegistryMatmul:
    """x @ W.T + b (F.linear's contract) through the kernel registry's `linear`, chosen for the
    first input's device and dtype (on the CPU it tunes the few rows of a decode step:
    kernels/cpu/tuned_linear.py)."""

    def __init__(self) -> None:
        self._fn: Callable[..., torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._fn is None:
            self._fn = kernels.select("linear", device=x.device, dtype=x.dtype)
        return self._fn(x, weight, bias)


class _Linear(nn.Module):
    def __init__(self, in_local: int, out_local: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_local, in_local), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False) if bias else None
        self._matmul = RegistryMatmul()

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._matmul(x, self.weight, bias)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, bias={self.bias is not None}"


class ColumnParallelLinear(_Linear):
    """y[T, sum(local outs)] = x[T, in] @ W_local.T; outputs of `parts` concatenated."""

    def __init__(self, in_features: int, parts: list[Part] | tuple[Part, ...], bias: bool,
                 layout: ParallelLayout, group: str = "attn_tp") -> None:
        n, r = layout.size(group), layout.rank_in(group)
        self.parts = tuple(parts)
        self.local_sizes = tuple(split_extent(p.out_features, p.unit, r, n, p.name)[1]
                                 for p in self.parts)
        super().__init__(in_features, sum(self.local_sizes), bias)
        self.in_features, self.group = in_features, group
        self.input_placement, self.output_placement = Replicate(group), Shard(-1, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out_local]
        return self._linear(x, self.bias)

    def weight_shardings(self, prefix: str) -> list[WeightSharding]:
        parent = _parent(prefix)
        out = [WeightSharding(f"{prefix}.weight", "column", self.group, tuple(
            WeightSource(f"{parent}{p.name}.weight", (p.out_features, self.in_features), p.unit)
            for p in self.parts), dim=0)]
        if self.bias is not None:
            out.append(WeightSharding(f"{prefix}.bias", "column", self.group, tuple(
                WeightSource(f"{parent}{p.name}.bias", (p.out_features,), p.unit)
                for p in self.parts), dim=0))
        return out


class RowParallelLinear(_Linear):
    """y[T, out] (Partial) = x[T, in_local] @ W[:, local in].T (+ bias on group rank 0)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, layout: ParallelLayout,
                 group: str = "attn_tp", unit: int = 1, name: str | None = None) -> None:
        n, r = layout.size(group), layout.rank_in(group)
        self.name = name
        self.unit = unit
        in_local = split_extent(in_features, unit, r, n, name or "row-parallel input")[1]
        super().__init__(in_local, out_features, bias)
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.add_bias = bias and r == 0
        self.input_placement, self.output_placement = Shard(-1, group), Partial(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in_local] -> [T, out] partial sums over the group
        return self._linear(x, self.bias if self.add_bias else None)

    def weight_shardings(self, prefix: str) -> list[WeightSharding]:
        name = f"{_parent(prefix)}{self.name}" if self.name else prefix
        out = [WeightSharding(f"{prefix}.weight", "row", self.group, (
            WeightSource(f"{name}.weight", (self.out_features, self.in_features), self.unit),),
            dim=1)]
        if self.bias is not None:
            out.append(WeightSharding(f"{prefix}.bias", "replicated", self.group,
                                      (WeightSource(f"{name}.bias", (self.out_features,)),)))
        return out


class ReplicatedLinear(_Linear):
    """y[T, out] = x[T, in] @ W.T with the whole weight on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 group: str = "attn_tp", name: str | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.in_features, self.out_features, self.group, self.name = (in_features, out_features,
                                                                      group, name)
        self.input_placement, self.output_placement = Replicate(group), Replicate(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        return self._linear(x, self.bias)

    def weight_shardings(self, prefix: str) -> list[WeightSharding]:
        name = f"{_parent(prefix)}{self.name}" if self.name else prefix
        out = [WeightSharding(f"{prefix}.weight", "replicated", self.group, (
            WeightSource(f"{name}.weight", (self.out_features, self.in_features)),))]
        if self.bias is not None:
            out.append(WeightSharding(f"{prefix}.bias", "replicated", self.group,
                                      (WeightSource(f"{name}.bias", (self.out_features,)),)))
        return out
