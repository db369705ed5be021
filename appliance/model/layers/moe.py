"""DeepSeekMoE (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2): shared experts + routed experts. The
same block serves Qwen3-MoE (softmax top-k, no shared expert: models/qwen3_moe.py) and GLM-4.5
(V3's routing plus shared experts: models/glm4_moe.py); each model file reads its MoEConfig.

    s      = router scores of h (softmax for V2, sigmoid for V3) over E routed experts
    top-k  = top_k experts by s (V3: by s + e_score_correction_bias), restricted to the best
             `topk_group` of `n_group` expert groups when grouped
    y      = sum_{e in top-k} g_e * FFN_e(h) + sum_shared FFN_shared(h)
             g_e = s_e (V3: renormalised over the top-k) * routed_scaling_factor

Routing is the `router_logits` and `moe_route` ops, the routed experts the `fused_moe` op.
Expert weights are stacked at load from the HF per-expert tensors: w13[E_local, 2 I_local, H]
(gate | up) and w2[E_local, H, I_local] (down). Parallelism: each expert's intermediate dim is
split over "moe_tp" (gate/up column-wise, down row-wise); with expert parallelism (moe_ep > 1)
the experts are also divided over "moe_ep", each rank computing only its own (the pairs
routed elsewhere get the id E_local, which fused_moe skips), and the shared experts are split
over every rank instead. Either way the output is a pending sum
(Partial) over all the ranks that contributed; the placement compiler reduces it.
The router runs in float32 on every rank (weights kept in float32, as HF does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import kernels
from appliance.model.context import BuildContext
from appliance.model.layers.mlp import SwiGLUMLP
from appliance.model.layers.norm import RMSNorm
from appliance.model.placement import (ParallelLayout, Partial, Placed, Replicate,
                                       WeightSharding, WeightSource, split_extent)


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    top_k: int
    scoring: str  # "softmax" (V2) | "sigmoid" (V3)
    renormalize: bool
    n_group: int  # 1: no group limit
    topk_group: int
    routed_scaling_factor: float
    correction_bias: bool  # V3's e_score_correction_bias

    def __post_init__(self) -> None:
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts {self.n_routed_experts} is not divisible by "
                             f"n_group {self.n_group}")

    @staticmethod
    def from_hf(hf: dict, version: int) -> "MoEConfig":
        """version 2: softmax scores, group-limited greedy when topk_method says so;
        version 3: sigmoid scores + correction bias, noaux_tc group top-k."""
        e = int(hf["n_routed_experts"])
        grouped = version == 3 or hf.get("topk_method") == "group_limited_greedy"
        n_group = int(hf.get("n_group") or 1) if grouped else 1
        scoring = hf.get("scoring_func") or ("sigmoid" if version == 3 else "softmax")
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func {scoring!r} is not supported (softmax, sigmoid)")
        return MoEConfig(
            hidden_size=int(hf["hidden_size"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"]), n_routed_experts=e,
            n_shared_experts=int(hf.get("n_shared_experts") or 0),
            top_k=int(hf["num_experts_per_tok"]), scoring=scoring,
            renormalize=_renormalize(hf, version),
            n_group=n_group, topk_group=int(hf.get("topk_group") or n_group) if grouped else 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            correction_bias=version == 3 or hf.get("topk_method") == "noaux_tc")


def _renormalize(hf: dict, version: int) -> bool:
    """V3 renormalises the top-k weights when norm_topk_prob. V2 does only when also
    top_k > 1 (DeepSeek's reference code); the released V2/V2-Lite configs set it False,
    the only case HF's DeepseekV2 implements."""
    norm = bool(hf.get("norm_topk_prob", False))
    return norm if version == 3 else norm and int(hf["num_experts_per_tok"]) > 1


def is_moe_layer(hf: dict, layer_idx: int) -> bool:
    """DeepSeek: dense MLP for the first `first_k_dense_replace` layers, then MoE on every
    `moe_layer_freq`-th layer (every layer in all released checkpoints)."""
    if not hf.get("n_routed_experts"):
        return False
    first_dense = int(hf.get("first_k_dense_replace") or 0)
    return layer_idx >= first_dense and layer_idx % int(hf.get("moe_layer_freq") or 1) == 0


class TopKRouter(nn.Module):
    """The router_logits op (h @ W_gate^T in float32), then the moe_route op."""

    def __init__(self, cfg: MoEConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(e, dtype=torch.float32), requires_grad=False)
            if cfg.correction_bias else None)
        self.logits = kernels.select("router_logits", device=ctx.device, dtype=ctx.dtype)
        self.normed_logits = kernels.select("rms_norm_router_logits", device=ctx.device,
                                            dtype=ctx.dtype)
        self.route = kernels.select("moe_route", device=ctx.device, dtype=torch.float32,
                                    num_experts=e, top_k=cfg.top_k)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> "TopKRouter":
        # Like HF (_keep_in_fp32_modules_strict), the router stays float32 when the model is
        # cast to bf16/fp16: re-cast any parameter the cast changed.
        super()._apply(fn, recurse)
        for name, p in list(self.named_parameters(recurse=False)):
            if p.dtype != torch.float32:
                setattr(self, name, nn.Parameter(p.to(torch.float32), requires_grad=False))
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, H] -> (weights [T, k] float32, expert ids [T, k] int32)
        return self.choose(self.logits(x, self.weight))                     # [T, E] f32

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward over norm(x, residual), the norm inside the logits' op -> (weights, ids,
        the normed x [T, H], the new residual [T, H])."""
        logits, normed, residual = self.normed_logits(x, residual, norm.weight, norm.eps,
                                                      self.weight)
        return *self.choose(logits), normed, residual

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts of router logits [T, E] float32 -> (weights [T, k], ids [T, k])."""
        c = self.cfg
        return self.route(logits, c.top_k, c.scoring, c.renormalize, self.e_score_correction_bias,
                          c.n_group, c.topk_group, c.routed_scaling_factor)

    def weight_shardings(self, prefix: str) -> list[WeightSharding]:
        out = [WeightSharding(f"{prefix}.weight", "replicated", "moe_tp",
                              (WeightSource(f"{prefix}.weight", tuple(self.weight.shape)),))]
        if self.e_score_correction_bias is not None:
            name = f"{prefix}.e_score_correction_bias"
            out.append(WeightSharding(name, "replicated", "moe_tp",
                                      (WeightSource(name, (self.cfg.n_routed_experts,)),)))
        return out


def local_routing(weights: torch.Tensor, ids: torch.Tensor, first: int, num_local: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert parallel: global expert ids [T, k] -> this rank's slots (experts first ..
    first + num_local - 1); other ranks' experts get slot num_local, which fused_moe skips,
    and weight 0, so that no term of theirs (an expert bias) can reach the output."""
    local = ids.long() - first                                               # [T, k]
    mine = (local >= 0) & (local < num_local)                                # [T, k]
    return weights * mine, torch.where(mine, local, num_local).to(torch.int32)


class RoutedExperts(nn.Module):
    """This rank's experts, stacked: w13[E_local, 2 I_local, H], w2[E_local, H, I_local]."""

    def __init__(self, cfg: MoEConfig, ctx: BuildContext) -> None:
        super().__init__()
        layout = ctx.layout
        e, inter, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.cfg = cfg
        self.first, self.num_local = split_extent(e, 1, layout.rank_in("moe_ep"),
                                                  layout.size("moe_ep"), "n_routed_experts")
        self.inter_local = split_extent(inter, 1, layout.rank_in("moe_tp"),
                                        layout.size("moe_tp"), "moe_intermediate_size")[1]
        self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * self.inter_local, h),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local, h, self.inter_local),
                               requires_grad=False)
        self.all_local = self.num_local == e
        self.fused_moe = kernels.select("fused_moe", device=ctx.device, dtype=ctx.dtype,
                                        num_experts=self.num_local, top_k=cfg.top_k,
                                        hidden=h, intermediate=self.inter_local)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                shared: torch.Tensor | None = None,
                shared_mlp: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # x: [T, H], weights/ids: [T, k] (global expert ids) -> [T, H] partial sums; shared
        # [T, H] (the shared experts' partial sums) added in the op's last launch, or
        # shared_mlp (their gate|up and down weights) run by the op
        if not self.all_local:
            weights, ids = local_routing(weights, ids, self.first, self.num_local)
        return self.fused_moe(x, self.w13, self.w2, weights, ids, shared=shared,
                              shared_mlp=shared_mlp)

    def weight_shardings(self, prefix: str) -> list[WeightSharding]:
        """Expert e of the checkpoint (`{prefix}.{e}.gate_proj.weight` ...) -> slot e - first."""
        c, out = self.cfg, []
        inter, h = c.moe_intermediate_size, c.hidden_size
        for slot in range(self.num_local):
            e = f"{prefix}.{self.first + slot}"
            out.append(WeightSharding(f"{prefix}.w13", "column", "moe_tp", (
                WeightSource(f"{e}.gate_proj.weight", (inter, h)),
                WeightSource(f"{e}.up_proj.weight", (inter, h))), dim=0, index=(slot,)))
            out.append(WeightSharding(f"{prefix}.w2", "row", "moe_tp", (
                WeightSource(f"{e}.down_proj.weight", (h, inter)),), dim=1, index=(slot,)))
        return out


def moe_output_group(layout: ParallelLayout) -> str:
    """The group the MoE output is a pending sum over: moe_tp, or with expert parallelism
    every rank (attn_tp spans the world in a tensor-parallel layout)."""
    if layout.size("moe_ep") == 1:
        return "moe_tp"
    if set(layout.ranks("attn_tp")) != set(range(layout.world_size)):
        raise ValueError("expert parallelism needs the attention TP group to span every rank")
    return "attn_tp"


class DeepseekMoE(Placed):
    """Shared experts + routed experts; input Replicate, output Partial (see module doc)."""

    def __init__(self, cfg: MoEConfig, ctx: BuildContext) -> None:
        super().__init__()
        group = moe_output_group(ctx.layout)
        self.gate = TopKRouter(cfg, ctx)
        self.experts = RoutedExperts(cfg, ctx)
        self.shared_experts = (
            SwiGLUMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, ctx,
                      group="moe_tp" if group == "moe_tp" else "dense_tp")
            if cfg.n_shared_experts else None)
        # one token on the GPU: the shared experts join the routed ones' launches (forward)
        self.fold_shared = ctx.device.type == "cuda"
        self.input_placement, self.output_placement = Replicate(group), Partial(group)
        self.folds_norm = True  # forward_normed: the norm inside the router's op
        self.fold_kind = "router"  # folds by default if in norm.FOLDED_KINDS

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, H] -> [T, H] (partial sums)
        return self._experts(hidden_states, *self.gate(hidden_states))

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward over norm(x, residual), the norm inside the router's op (which hands the
        experts the normed x) -> (out, residual)."""
        weights, ids, normed, residual = self.gate.forward_normed(norm, x, residual)
        return self._experts(normed, weights, ids), residual

    def _experts(self, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                 ) -> torch.Tensor:
        # hidden_states: [T, H], the routing (weights, ids) [T, k] -> [T, H] (partial sums)
        mlp = self.shared_experts
        if mlp is not None and self.fold_shared and hidden_states.shape[0] == 1:
            # one token: the op runs the shared experts inside its GEMVs (moe_gemv.py), two
            # launches fewer a layer
            weights_of_shared = (mlp.gate_up_proj.weight, mlp.down_proj.weight)
            return self.experts(hidden_states, weights, ids, shared_mlp=weights_of_shared)
        shared = mlp(hidden_states) if mlp is not None else None              # [T, H]
        return self.experts(hidden_states, weights, ids, shared)              # [T, H]
