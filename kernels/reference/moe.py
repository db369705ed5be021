"""Mixture-of-experts routing (DeepSeek-V2 / V3 semantics, as in HF transformers) and the
expert computation (SwiGLU experts; GPT-OSS's biased experts with the clamped SwiGLU of
kernels/moe_activation.py and gate/up rows interleaved)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.moe_activation import ClampedSwiGLU
from kernels.mxfp4 import dequantize
from kernels.reference.norm import pre_norm
from kernels.registry import register


def _group_mask(choice: torch.Tensor, n_group: int, topk_group: int,
                scoring: str) -> torch.Tensor:
    """choice: [T, E] -> bool [T, E], True for experts in the top `topk_group` groups.
    A group's score is its max (softmax, V2) or the sum of its top-2 (sigmoid, V3)."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)                         # [T, G, E/G]
    if scoring == "softmax":
        gscore = grouped.max(dim=-1).values                                  # [T, G]
    else:
        gscore = grouped.topk(2, dim=-1).values.sum(dim=-1)                  # [T, G]
    gidx = gscore.topk(topk_group, dim=-1).indices                           # [T, topk_group]
    gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gidx, True)
    return gmask[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)


@register("router_logits", backend="torch", priority=0)
def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [T, H] (any float dtype), weight: [E, H] -> [T, E] float32: x @ weight^T computed in
    float32, as HF's DeepSeek gate does."""
    return F.linear(x.float(), weight.float())


@register("rms_norm_router_logits", backend="torch", priority=0)
def rms_norm_router_logits(x: torch.Tensor, residual: torch.Tensor | None,
                           norm_weight: torch.Tensor, eps: float, weight: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MoE layer's pre-norm and its router: (normed, new residual) =
    fused_add_rms_norm(x, residual, norm_weight, eps) (rms_norm(x) and x when residual is
    None) -> (router_logits(normed, weight) [T, E] float32, normed [T, H], new residual)."""
    normed, residual = pre_norm(x, residual, norm_weight, eps)
    return router_logits(normed, weight), normed, residual


@register("moe_route", backend="torch", priority=0)
def moe_route(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool,
              bias: torch.Tensor | None, n_group: int, topk_group: int,
              routed_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, k] float32, ids [T, k] int32).

    softmax (DeepSeek-V2): scores = softmax(logits); group-limited when n_group > 1 (groups
    ranked by their max score, the rest masked to 0). sigmoid (V3): scores = sigmoid(logits);
    selection uses scores + bias (e_score_correction_bias), groups ranked by the sum of their
    top-2, weights are the unbiased scores. Then optional renormalization (sum + 1e-20) and
    multiplication by routed_scaling."""
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"moe_route: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    logits = router_logits.float()                                           # [T, E]
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores + bias.float() if bias is not None else scores           # [T, E]
    if n_group > 1 and topk_group < n_group:
        fill = 0.0 if scoring == "softmax" else float("-inf")
        choice = choice.masked_fill(~_group_mask(choice, n_group, topk_group, scoring), fill)
    ids = choice.topk(top_k, dim=-1).indices                                 # [T, k]
    weights = scores.gather(1, ids)                                          # [T, k]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling, ids.to(torch.int32)


def split_gate_up(h: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """h: [n, 2I] -> (gate, up) [n, I]: halves, or alternating rows of w13 when interleaved."""
    if interleaved:
        return h[:, 0::2], h[:, 1::2]
    inter = h.shape[1] // 2
    return h[:, :inter], h[:, inter:]


def activate(gate: torch.Tensor, up: torch.Tensor, activation: ClampedSwiGLU | None
             ) -> torch.Tensor:
    """silu(gate) * up, or GPT-OSS's clamped SwiGLU."""
    if activation is None:
        return F.silu(gate) * up
    gate = gate.clamp(max=activation.limit)
    up = up.clamp(-activation.limit, activation.limit)
    return (up + 1) * gate * torch.sigmoid(gate * activation.alpha)


@register("fused_moe", backend="torch", priority=0)
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
              activation: ClampedSwiGLU | None = None, interleaved: bool = False,
              shared: torch.Tensor | None = None,
              shared_mlp: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x: [T, H], w13: [E, 2I, H], w2: [E, H, I], weights/ids: [T, k]
    -> sum_k weights * (act(x @ w13[e].T + b13[e]) @ w2[e].T + b2[e]) (+ shared)  [T, H].
    shared [T, H] (the shared experts' output) joins the sum before it is rounded; or
    shared_mlp, the shared experts' own weights (gate|up [2 Is, H] in halves, down [H, Is]):
    their silu(gate) * up, rounded like an expert's, then down, join it instead.

    act: silu(gate) * up, or `activation` (ClampedSwiGLU); gate/up are the halves of w13's
    rows, or alternate rows when `interleaved`. Biases b13 [E, 2I] / b2 [E, H] are optional.
    Weights may be any strided views (GPT-OSS keeps HF's [E, H, 2I] tensors, transposed)."""
    t, k = ids.shape
    here = ids < w13.shape[0]     # id E: an expert of another rank (EP), contributes nothing
    weights, ids = weights * here, torch.where(here, ids, 0)
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)                         # [n], [n]
        h = x[tok].float() @ w13[e].float().t()                               # [n, 2I]
        if b13 is not None:
            h = h + b13[e].float()
        a = activate(*split_gate_up(h, interleaved), activation)              # [n, I]
        y = a.to(x.dtype).float() @ w2[e].float().t()                         # [n, H]
        if b2 is not None:
            y = y + b2[e].float()
        out.index_add_(0, tok, y * weights[tok, slot].float()[:, None])
    if shared is not None:
        out += shared.float()
    if shared_mlp is not None:
        sw13, sw2 = shared_mlp
        a = activate(*split_gate_up(x.float() @ sw13.float().t(), False), None)   # [T, Is]
        out += a.to(x.dtype).float() @ sw2.float().t()
    return out.to(x.dtype)


@register("fused_moe_mxfp4", backend="torch", priority=0)
def fused_moe_mxfp4(x: torch.Tensor, w13_blocks: torch.Tensor, w13_scales: torch.Tensor,
                    w2_blocks: torch.Tensor, w2_scales: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor, b13: torch.Tensor | None = None,
                    b2: torch.Tensor | None = None, activation: ClampedSwiGLU | None = None,
                    interleaved: bool = True) -> torch.Tensor:
    """fused_moe with MXFP4 weights (kernels/mxfp4.py): w13 = blocks [E, 2I, H/32, 16] +
    scales [E, 2I, H/32], w2 = [E, H, I/32, 16] + [E, H, I/32], dequantized to x's dtype."""
    w13 = dequantize(w13_blocks, w13_scales, x.dtype)                        # [E, 2I, H]
    w2 = dequantize(w2_blocks, w2_scales, x.dtype)                           # [E, H, I]
    return fused_moe(x, w13, w2, weights, ids, b13, b2, activation, interleaved)
