"""GPT-OSS's mixture of experts: a biased router and biased experts with the clamped SwiGLU.

    logits = h @ W_router^T + b_router                       (in the model's dtype, as HF)
    top-k  = the k largest logits;  g = softmax over those k logits
    y      = sum_{e in top-k} g_e * (act(h @ W_gate_up[e] + b_gate_up[e]) @ W_down[e] + b_down[e])
    act    = kernels.ClampedSwiGLU (alpha 1.702, limit 7): gate and up alternate along 2I

The top-k softmax is the `moe_route` op's softmax scores renormalised over the top k (the
same numbers). The experts are the `fused_moe` op with its bias / activation / interleaved
options. The parameters keep the checkpoint's layout, so a checkpoint loads slice by slice:

    gate_up_proj [E, H, 2I] (gate, up interleaved)   gate_up_proj_bias [E, 2I]
    down_proj    [E, I, H]                            down_proj_bias    [E, H]

and the kernel reads them transposed (`[E, 2I, H]` / `[E, H, I]` views, no copy). An MXFP4
checkpoint (`quantization_config.quant_method: mxfp4`, the released weights) keeps its
experts packed where a kernel reads them so (`fused_moe_mxfp4`, Triton on CUDA):
`gate_up_proj_blocks [E, 2I, H/32, 16]` + `_scales [E, 2I, H/32]`, `down_proj_blocks
[E, H, I/32, 16]` + `_scales [E, H, I/32]`, uint8, a quarter of bf16's bytes. Where only the
torch reference would serve it (CPU, or `kernels.override.fused_moe_mxfp4: torch`), which
dequantizes every expert at every step, the loader dequantizes them once instead
(appliance/model/mxfp4.py) into the bf16 parameters above.

Parallelism: over "moe_tp" each expert's intermediate dim is split (gate/up pairs stay
together: unit 2 of 2I; packed down_proj in whole 32-element groups), the down bias added by
moe_tp rank 0 only; over "moe_ep" whole
experts are divided. Either way the output is a pending sum (Partial), reduced by the
placement compiler. Splitting both at once (EP groups narrower than the world) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from appliance.model.context import BuildContext
from appliance.model.layers.linear import ReplicatedLinear
from appliance.model.layers.moe import local_routing, moe_output_group
from appliance.model.placement import (Partial, Placed, Replicate, WeightSharding, WeightSource,
                                       split_extent)
from kernels.mxfp4 import BLOCK, BLOCK_BYTES


@dataclass(frozen=True)
class GptOssMoEConfig:
    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    activation: kernels.ClampedSwiGLU
    mxfp4: bool = False   # the checkpoint's experts are MXFP4

    @staticmethod
    def from_hf(hf: dict) -> "GptOssMoEConfig":
        quant = hf.get("quantization_config") or {}
        return GptOssMoEConfig(
            hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
            num_experts=int(hf["num_local_experts"]),
            top_k=int(hf.get("num_experts_per_tok") or hf["experts_per_token"]),
            activation=kernels.ClampedSwiGLU(alpha=float(hf.get("swiglu_alpha", 1.702)),
                                             limit=float(hf.get("swiglu_limit", 7.0))),
            mxfp4=isinstance(quant, dict) and quant.get("quant_method") == "mxfp4")


class GptOssExperts(nn.Module):
    """This rank's experts in the checkpoint's layout, bf16 or MXFP4 (module doc); forward =
    the fused_moe / fused_moe_mxfp4 op."""

    def __init__(self, cfg: GptOssMoEConfig, ctx: BuildContext) -> None:
        super().__init__()
        layout = ctx.layout
        e, inter, h = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
        tp, ep = layout.size("moe_tp"), layout.size("moe_ep")
        if tp > 1 and ep > 1:
            raise ValueError(f"GPT-OSS experts split over moe_tp ({tp}) and moe_ep ({ep}) at "
                             "once are not supported: use tensor or expert parallelism alone")
        self.cfg = cfg
        self.first, self.num_local = split_extent(e, 1, layout.rank_in("moe_ep"), ep,
                                                  "num_local_experts")
        self.inter_local = split_extent(inter, 1, layout.rank_in("moe_tp"), tp,
                                        "intermediate_size")[1]
        self.all_local = self.num_local == e
        self.add_down_bias = layout.rank_in("moe_tp") == 0
        n, i = self.num_local, self.inter_local
        feats = dict(device=ctx.device, dtype=ctx.dtype, num_experts=n, top_k=cfg.top_k,
                     hidden=h, intermediate=i, biases=True, activation="clamped_swiglu")
        self.packed = cfg.mxfp4 and kernels.selected_backend("fused_moe_mxfp4", **feats) != "torch"
        op = "fused_moe_mxfp4" if self.packed else "fused_moe"
        self.fused_moe = kernels.select(op, **feats)
        empty = dict(requires_grad=False)
        if self.packed:
            if i % BLOCK:
                raise ValueError(f"MXFP4 experts: intermediate_size {inter} over moe_tp {tp} "
                                 f"leaves {i} per rank, not a multiple of {BLOCK}")
            u8 = dict(dtype=torch.uint8)
            self.gate_up_proj_blocks = nn.Parameter(
                torch.empty(n, 2 * i, h // BLOCK, BLOCK_BYTES, **u8), **empty)
            self.gate_up_proj_scales = nn.Parameter(torch.empty(n, 2 * i, h // BLOCK, **u8),
                                                    **empty)
            self.down_proj_blocks = nn.Parameter(
                torch.empty(n, h, i // BLOCK, BLOCK_BYTES, **u8), **empty)
            self.down_proj_scales = nn.Parameter(torch.empty(n, h, i // BLOCK, **u8), **empty)
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(n, h, 2 * i), **empty)
            self.down_proj = nn.Parameter(torch.empty(n, i, h), **empty)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(n, 2 * i), **empty)
        self.down_proj_bias = nn.Parameter(torch.empty(n, h), **empty)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H], weights/ids: [T, k] (global expert ids) -> [T, H] partial sums
        if not self.all_local:
            weights, ids = local_routing(weights, ids, self.first, self.num_local)
        if self.packed:
            w13: tuple = (self.gate_up_proj_blocks, self.gate_up_proj_scales)
            w2: tuple = (self.down_proj_blocks, self.down_proj_scales)
        else:
            w13 = (self.gate_up_proj.transpose(1, 2),)                          # [E, 2I, H]
            w2 = (self.down_proj.transpose(1, 2),)                              # [E, H, I]
        return self.fused_moe(x, *w13, *w2, weights, ids, b13=self.gate_up_proj_bias,
                              b2=self.down_proj_bias if self.add_down_bias else None,
                              activation=self.cfg.activation, interleaved=True)

    def weight_shardings(self, prefix: str) -> list[WeightSharding]:
        c = self.cfg
        e, h, inter = c.num_experts, c.hidden_size, c.intermediate_size
        full = {"gate_up_proj_bias": (e, 2 * inter), "down_proj_bias": (e, h)}
        # (name, style, split dim, unit) of the expert weights over moe_tp
        if self.packed:
            full.update(gate_up_proj_blocks=(e, 2 * inter, h // BLOCK, BLOCK_BYTES),
                        gate_up_proj_scales=(e, 2 * inter, h // BLOCK),
                        down_proj_blocks=(e, h, inter // BLOCK, BLOCK_BYTES),
                        down_proj_scales=(e, h, inter // BLOCK))
            tp = [("gate_up_proj_blocks", "column", 1, 2), ("gate_up_proj_scales", "column", 1, 2),
                  ("down_proj_blocks", "row", 2, 1), ("down_proj_scales", "row", 2, 1)]
        else:
            full.update(gate_up_proj=(e, h, 2 * inter), down_proj=(e, inter, h))
            tp = [("gate_up_proj", "column", 2, 2), ("down_proj", "row", 1, 1)]
        if not self.all_local:  # expert parallel: whole experts, split along dim 0
            return [WeightSharding(f"{prefix}.{n}", "column", "moe_ep",
                                   (WeightSource(f"{prefix}.{n}", shape),), dim=0)
                    for n, shape in full.items()]
        tp.append(("gate_up_proj_bias", "column", 1, 2))
        out = [WeightSharding(f"{prefix}.{n}", style, "moe_tp",
                              (WeightSource(f"{prefix}.{n}", full[n], unit),), dim=dim)
               for n, style, dim, unit in tp]
        name = f"{prefix}.down_proj_bias"
        out.append(WeightSharding(name, "replicated", "moe_tp",
                                  (WeightSource(name, full["down_proj_bias"]),)))
        return out


class GptOssMoE(Placed):
    """router -> top-k softmax -> experts; input Replicate, output Partial (module doc)."""

    def __init__(self, cfg: GptOssMoEConfig, ctx: BuildContext) -> None:
        super().__init__()
        group = moe_output_group(ctx.layout)
        self.cfg = cfg
        self.router = ReplicatedLinear(cfg.hidden_size, cfg.num_experts, True, group)
        self.experts = GptOssExperts(cfg, ctx)
        self.route = kernels.select("moe_route", device=ctx.device, dtype=torch.float32,
                                    num_experts=cfg.num_experts, top_k=cfg.top_k)
        self.input_placement, self.output_placement = Replicate(group), Partial(group)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, H] -> [T, H] (partial sums)
        logits = self.router(hidden_states)                                  # [T, E]
        weights, ids = self.route(logits, self.cfg.top_k, "softmax", True, None, 1, 1, 1.0)
        return self.experts(hidden_states, weights, ids)
