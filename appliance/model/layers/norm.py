"""RMSNorm on the hidden-state chain, optionally with the residual add fused in.

`RMSNorm(x, residual)` returns `(rms_norm(x + residual), x + residual)` (or
`(rms_norm(x), x)` when residual is None, the first layer). Its input must be Replicate;
when the producer's output is Partial the compiler hands it a fused all-reduce step
(`set_fused_reduce`) and the norm runs that step instead of the plain kernels.
`HeadRMSNorm` normalises each attention head (Qwen3's q_norm / k_norm); it is not on the
chain.

A norm can also go into the first linear that reads its output (`folds_into`, `into`: the
`rms_norm_linear` op, one GEMV launch at one token instead of the norm's and the GEMV's).
The consumers that can take it (attention's q|k|v or MLA's q|kv_a projection, the dense
MLP's gate|up, the LM head after the final norm; a MoE's router, whose op hands the experts
the normed row: `rms_norm_router_logits`) say so with `folds_norm` and run it in
`forward_normed`; the decoder layer chooses. Only on the device types of `FOLD_NORMS_ON`
(CUDA; TOKENSPEED_FOLD_NORMS=0 at start-up: none) and for the consumer kinds of
`FOLDED_KINDS`, those the H200 measured to win.

A norm's scale can also go into its consumer's weight at load (`plan_scale_folds` before
the load, `fold_scales` after: W[:, k] *= g[k], g = 1), for the consumers of `SCALED_KINDS`
(attention's q|k|v, the dense MLP's gate|up, an untied LM head). Such a norm (`unit_scale`)
always folds, and its op reads no norm weight: one token's norm costs its consumer the sum of
squares of the row it streams anyway and the residual's add (the dense MLP's norm, whose
weight loads made its fold lose, folds too).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import torch
from torch import nn

import kernels
from kernels.reference.norm import pre_norm
from appliance.model.placement import Placed, Replicate, WeightSharding, WeightSource


FOLD_NORMS_ENV = "TOKENSPEED_FOLD_NORMS"


def fold_norms_on(env: Mapping[str, str]) -> frozenset[str]:
    """The device types on which norms fold: CUDA; none with TOKENSPEED_FOLD_NORMS=0 at
    start-up (a daemon A/B)."""
    return frozenset() if env.get(FOLD_NORMS_ENV) == "0" else frozenset({"cuda"})


# Each consumer's `fold_kind`: attention's q|k|v, MLA's q|kv_a, a dense MLP's gate|up, a MoE's
# router, the LM head.
FOLD_KINDS = frozenset({"attention", "mla", "mlp", "router", "head"})
# The kinds whose fold wins at batch 1 (H200, scripts/gpu_op_ablation.py fold_only=KIND, CUDA
# graph replays, us a step against no fold): Llama-3.1-8B q|k|v -38 (-36 again in the
# twenty-second session), gate|up +139 (its 1,792 programs each re-read the row, residual and
# norm weight; taller tiles lost more, kernels/triton/gemv.py), head +2; DeepSeek-V2-Lite
# q|kv_a -52, router, dense MLP and head within 4.
FOLDED_KINDS = frozenset({"attention", "mla"})

# The kinds whose weight takes their norm's scale at load (then their norm always folds).
# A tied LM head shares the embedding's weight, so it takes none. H100 (twenty-sixth session,
# gpu_op_ablation.py `unscaled`, the 8B's B=1 decode graph over 1K keys, 3 rounds, two calls):
# 5,463 / 5,462 us a step as before (FOLDED_KINDS only, norm weights read) -> 5,376 / 5,373.
SCALED_KINDS = frozenset({"attention", "mlp", "head"})

# read at each forward, so a test or an in-graph A/B may set them on a built model
FOLD_NORMS_ON: frozenset[str] = fold_norms_on(os.environ)


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
        self.rms_norm_linear = kernels.select("rms_norm_linear", device=device, dtype=dtype)
        self.input_placement = self.output_placement = Replicate(group)
        self.fused_reduce: Callable | None = None
        # plan_scale_fold: the linear whose weight takes this norm's scale at load (in a
        # tuple, so that it is not registered as a submodule); then the norm's ops run with a
        # unit scale (None), as its weight will be all ones
        self._scale_target: tuple[nn.Module, ...] = ()

    def set_fused_reduce(self, step: Callable) -> None:
        self.fused_reduce = step

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, H], residual: [T, H] | None -> (normed [T, H], new residual [T, H])
        if self.fused_reduce is not None:
            return self.fused_reduce(x, residual, self.weight, self.eps, self.rms_norm,
                                     self.fused_add_rms_norm)
        return pre_norm(x, residual, self.weight, self.eps, self.rms_norm,
                        self.fused_add_rms_norm)

    def folds_into(self, consumer: nn.Module) -> bool:
        """Whether `consumer` runs this norm inside its first linear (its `forward_normed`):
        on a device of FOLD_NORMS_ON, where it can (`folds_norm`) and wins (its `fold_kind` in
        FOLDED_KINDS, or this norm's scale in its weight: `unit_scale`), and no collective lies
        between them (none fused into the norm, no hook on the consumer)."""
        return ((getattr(consumer, "fold_kind", None) in FOLDED_KINDS or self.unit_scale)
                and self._can_fold(consumer))

    def _can_fold(self, consumer: nn.Module) -> bool:
        return (self.weight.device.type in FOLD_NORMS_ON
                and getattr(consumer, "folds_norm", False) and self.fused_reduce is None
                and not consumer._forward_hooks and not consumer._forward_pre_hooks)

    def plan_scale_fold(self, consumer: nn.Module) -> None:
        """Before the load: if `consumer` (of SCALED_KINDS, its `scale_target` a linear of this
        norm's dtype) can fold this norm, its weight will take the scale (`fold_scale`), and
        from now on the norm runs with a unit scale (so compile-ahead builds those kernels)."""
        target = getattr(consumer, "scale_target", None)
        if (getattr(consumer, "fold_kind", None) in SCALED_KINDS and target is not None
                and self._can_fold(consumer) and target.weight.dtype == self.weight.dtype):
            self._scale_target = (target,)

    @property
    def unit_scale(self) -> bool:
        """Whether this norm's scale goes (went) into its consumer's weight."""
        return bool(self._scale_target)

    def fold_scale(self) -> None:
        """After the load: W[:, k] *= g[k] (rounded once, in W's dtype) and g = 1."""
        with torch.no_grad():
            for target in self._scale_target:
                target.weight.mul_(self.weight)
                self.weight.fill_(1.0)

    def into(self, linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
             silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(linear's output over this norm's, or with silu_mul its SwiGLU activation, new
        residual), in one op: x, residual [T, H] -> ([T, out], [T, H])."""
        return self.rms_norm_linear(x, residual, None if self.unit_scale else self.weight,
                                    self.eps, linear.weight, linear.bias, silu_mul)


class HeadRMSNorm(_NormWeight):
    """RMSNorm over the last dim of [T, heads, head_dim] (weight [head_dim])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, Hn, D] -> [T, Hn, D]
        t, h, d = x.shape
        return self.rms_norm(x.reshape(t * h, d), self.weight, self.eps).view(t, h, d)


def plan_scale_folds(model: nn.Module) -> None:
    """Every (norm, consumer) pair a module names (`norm_consumers()`) whose consumer's weight
    will take the norm's scale (RMSNorm.plan_scale_fold); before the load."""
    for module in model.modules():
        for norm, consumer in getattr(module, "norm_consumers", lambda: ())():
            norm.plan_scale_fold(consumer)


def fold_scales(model: nn.Module) -> None:
    """After the load: the planned norms' scales into their consumers' weights."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fold_scale()
