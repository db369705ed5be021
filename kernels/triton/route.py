"""MoE routing in Triton: the router's logits, then the choice of experts, one launch each.

`router_logits` (decode batches): x [T, H] upcast and dotted with the float32 gate [E, H] in
float32 registers, one program per (token, BLOCK_E experts), BLOCK_E x BLOCK_K gate elements
per load. The reference takes three launches at batch 1 (the cast of x, cuBLAS's fp32 GEMV
and its split reduction); prefill-sized batches go to it (cuBLAS's fp32 GEMM).

`rms_norm_router_logits`: one token's pre-norm (and residual add) in the router's own launch
(`RouterNorm`): each program sums the row's squares as it dots it, scales its logits by
1 / rms, and stores its slice of the normed row (the experts' input) and of the new residual.
More tokens: the norm kernel, then `router_logits`.

`moe_route`: one program per token.

The gate is a weight, never written while serving: with PDL a program reads its first gate
tile before its wait (`EARLY_TILE`), so only x's load, the sum and the store follow the launch
before. H200, DeepSeek-V2-Lite's B=1 decode graph (1K keys; `scripts/gpu_op_ablation.py
--ablations router_after_wait`, 3 rounds): 2,375 -> 2,349 us a step. The same for the GEMV's
first weight tile (in registers, the second asked into L2) was noise: Llama-3.1-8B 4,197 ->
4,214, DeepSeek-V2-Lite 2,356 -> 2,349; the GEMV keeps its L2 prefetch (gemv.py).

The torch reference (kernels/reference/moe.py) takes softmax/sigmoid, a top-k, a gather and,
for group-limited routing, a few more small kernels per MoE layer: at batch-1 decode each is a
few microseconds of launch-bound GPU time, 26 times per DeepSeek-V2-Lite token. Here a program
loads its token's E logits (E <= 1024) and does everything in registers: the scores, the
group-limited choice (groups ranked by their max score for softmax, by the sum of their top 2
for sigmoid; the others filled like the reference: 0 for softmax, -inf for sigmoid), then
TOP_K rounds of argmax (ties go to the lowest expert id), the weights gathered from the
unbiased scores, optionally renormalized, times routed_scaling. The ids come out in the
reference's order (descending choice)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.reference.moe import router_logits as reference_router_logits
from kernels.reference.norm import pre_norm
from kernels.registry import register
from kernels.triton.common import PRIORITY, check, next_pow2, on_cuda
from kernels.triton.elementwise import fused_add_rms_norm, rms_norm
from kernels.triton.pdl import pdl_begin, pdl_launch

MAX_EXPERTS = 1024
ROUTER_ROWS_MAX = 64       # more tokens: the reference's fp32 GEMM
# gate elements one program loads at a time (BLOCK_E x BLOCK_K): 2048 gives DeepSeek-V2-Lite's
# [64, 2048] gate one expert per program, 64 programs (fewer, wider programs were no faster
# than the reference: docs/KERNELS.md, "Router logits")
ROUTER_TILE_ELEMS = 2048
EARLY_TILE = True          # the first gate tile read before the PDL wait (module doc)


@triton.jit
def _router_input(X, R, G, k, k_ok, NORM: tl.constexpr, HAS_RES: tl.constexpr):
    """The token's chunk k of X (pointers X, R: the token's row) as the router dots it, in
    float32 -> (chunk, its squares). NORM: the RMS norm's input X + R (rounded to X's dtype,
    as fused_add_rms_norm stores it), times the norm weight G (1 / rms comes after the dot)."""
    x = tl.load(X + k, mask=k_ok, other=0.0)
    if NORM:
        if HAS_RES:
            r = tl.load(R + k, mask=k_ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        xf = x.to(tl.float32)
        return xf * tl.load(G + k, mask=k_ok, other=0.0).to(tl.float32), xf * xf
    return x.to(tl.float32), tl.zeros(k.shape, dtype=tl.float32)


@triton.jit
def _router_logits_kernel(X, W, Out, R, G, Normed, ResOut, stride_x, stride_w, stride_o, eps,
                          H: tl.constexpr, E: tl.constexpr, BLOCK_E: tl.constexpr,
                          BLOCK_K: tl.constexpr, SLICE: tl.constexpr, BLOCK_S: tl.constexpr,
                          EARLY: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
                          PDL: tl.constexpr):
    """Out[t, e] = sum_k float(X[t, k]) * W[e, k] for the program's BLOCK_E experts. EARLY:
    the first gate tile is read before the PDL wait (a weight: pdl.py). NORM: X is RMS-normed
    first (weight G; HAS_RES: X + R), each program summing the squares as it dots the row and
    scaling its logits by 1 / rms; then each stores its SLICE of the row's elements normed in
    Normed (the experts' input, as the norm kernel computes and rounds it) and, HAS_RES, of
    X + R in ResOut."""
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)                  # [BLOCK_E]
    e_ok = e < E
    kk = tl.arange(0, BLOCK_K)                                             # [BLOCK_K]
    if EARLY:
        w0 = tl.load(W + e[:, None] * stride_w + kk[None, :],
                     mask=e_ok[:, None] & (kk < H)[None, :], other=0.0)    # [E_B, K]
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    X, R = X + t * stride_x, R + t * stride_x
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)                             # NORM: squares
    if EARLY:
        x0, sq = _router_input(X, R, G, kk, kk < H, NORM, HAS_RES)
        ss += sq
        acc += tl.sum(w0.to(tl.float32) * x0[None, :], 1)
    for k0 in tl.range(BLOCK_K if EARLY else 0, H, BLOCK_K):
        k = k0 + kk
        k_ok = k < H
        x, sq = _router_input(X, R, G, k, k_ok, NORM, HAS_RES)
        ss += sq
        w = tl.load(W + e[:, None] * stride_w + k[None, :],
                    mask=e_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [E_B, K]
        acc += tl.sum(w * x[None, :], 1)
    if NORM:
        inv = 1.0 / tl.sqrt(tl.sum(ss, 0) / H + eps)
        acc = acc * inv
        j = tl.arange(0, BLOCK_S)
        k = tl.program_id(1) * SLICE + j
        k_ok = (j < SLICE) & (k < H)
        h = tl.load(X + k, mask=k_ok, other=0.0)
        if HAS_RES:
            h = (h.to(tl.float32) + tl.load(R + k, mask=k_ok, other=0.0).to(tl.float32)
                 ).to(h.dtype)
            tl.store(ResOut + t * stride_x + k, h, mask=k_ok)
        g = tl.load(G + k, mask=k_ok, other=0.0).to(tl.float32)
        tl.store(Normed + t * stride_x + k, (h.to(tl.float32) * inv * g).to(h.dtype), mask=k_ok)
    tl.store(Out + t * stride_o + e, acc, mask=e_ok)


def _early(launch: dict[str, bool]) -> dict[str, bool]:
    """The launch keywords with EARLY: the first gate tile read before the PDL wait."""
    return {**launch, "EARLY": launch["PDL"] and EARLY_TILE}


@register("router_logits", backend="triton", priority=PRIORITY, supports=on_cuda)
def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [T, H], weight: [E, H] -> [T, E] float32 (see the module docstring)."""
    t, h = x.shape
    e = weight.shape[0]
    check(weight.dim() == 2 and weight.shape[1] == h, "router_logits: weight must be [E, H]")
    if t > ROUTER_ROWS_MAX:
        return reference_router_logits(x, weight)
    check(x.stride(1) == 1 and weight.stride(1) == 1, "router_logits: rows must be contiguous")
    out = torch.empty(t, e, dtype=torch.float32, device=x.device)
    if t == 0:
        return out
    _launch_router(x, weight, out)
    return out


def _launch_router(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                   norm: RouterNorm | None = None) -> None:
    """The router kernel over x's rows into out (norm: x RMS-normed first, see RouterNorm)."""
    t, h = x.shape
    e = weight.shape[0]
    block_k = min(next_pow2(h), ROUTER_TILE_ELEMS)
    block_e = max(1, min(next_pow2(e), ROUTER_TILE_ELEMS // block_k))
    programs = triton.cdiv(e, block_e)
    has_res = norm is not None and norm.residual is not None
    slice_ = triton.cdiv(h, programs)
    _router_logits_kernel[(t, programs)](
        x, weight, out, norm.residual if has_res else x, norm.weight if norm else x,
        norm.normed if norm else x, norm.residual_out if has_res else x, x.stride(0),
        weight.stride(0), out.stride(0), norm.eps if norm else 0.0, H=h, E=e,
        BLOCK_E=block_e, BLOCK_K=block_k, SLICE=slice_ if norm else 1,
        BLOCK_S=next_pow2(slice_) if norm else 1,
        NORM=norm is not None, HAS_RES=has_res, num_warps=4, **_early(pdl_launch(x.device)))


@dataclass(frozen=True)
class RouterNorm:
    """The RMS norm the router kernel applies to its rows first: weight [H], eps, the residual
    [T, H] added before it (None: none) and the outputs it fills: normed [T, H] (the experts'
    input) and residual_out [T, H] (the sum, when there is a residual)."""
    weight: torch.Tensor
    eps: float
    normed: torch.Tensor
    residual: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None


@register("rms_norm_router_logits", backend="triton", priority=PRIORITY, supports=on_cuda)
def rms_norm_router_logits(x: torch.Tensor, residual: torch.Tensor | None,
                           norm_weight: torch.Tensor, eps: float, weight: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's contract (kernels/reference/moe.py). One contiguous token: the router
    kernel with the norm in its loads (NORM: the norm kernel's launch gone; the logits from
    the normed row unrounded). More tokens: the norm kernel, then `router_logits`."""
    one = (x.shape[0] == 1 and x.is_contiguous() and weight.stride(1) == 1
           and (residual is None or (residual.shape == x.shape and residual.is_contiguous()))
           and norm_weight.is_contiguous())
    if not one:
        normed, residual = pre_norm(x, residual, norm_weight, eps, rms_norm, fused_add_rms_norm)
        return router_logits(normed, weight), normed, residual
    out = torch.empty(1, weight.shape[0], dtype=torch.float32, device=x.device)
    norm = RouterNorm(norm_weight, eps, torch.empty_like(x), residual,
                      torch.empty_like(x) if residual is not None else None)
    _launch_router(x, weight, out, norm)
    return out, norm.normed, norm.residual_out if residual is not None else x



@triton.jit
def _limit_groups(choice, e, E: tl.constexpr, BLOCK_E: tl.constexpr, N_GROUP: tl.constexpr,
                  TOPK_GROUP: tl.constexpr, BLOCK_G: tl.constexpr, SOFTMAX: tl.constexpr):
    """choice [BLOCK_E] with only the experts of the best TOPK_GROUP of N_GROUP groups kept."""
    gid = e // (E // N_GROUP)                                  # [BLOCK_E]; padding: >= N_GROUP
    g = tl.arange(0, BLOCK_G)                                  # [BLOCK_G]
    gscore = tl.full([BLOCK_G], float("-inf"), tl.float32)     # [BLOCK_G]
    for j in tl.static_range(N_GROUP):
        in_g = gid == j
        m1 = tl.max(tl.where(in_g, choice, float("-inf")), 0)
        if SOFTMAX:
            s = m1
        else:  # the sum of the group's top 2: drop one occurrence of the max, take the max
            first = tl.min(tl.where(in_g & (choice == m1), e, BLOCK_E), 0)
            s = m1 + tl.max(tl.where(in_g & (e != first), choice, float("-inf")), 0)
        gscore = tl.where(g == j, s, gscore)
    keep = gid < 0                                             # all False, [BLOCK_E]
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.argmax(gscore, 0)
        keep = keep | (gid == best)
        gscore = tl.where(g == best, float("-inf"), gscore)
    return tl.where(keep, choice, 0.0 if SOFTMAX else float("-inf"))


@triton.jit
def _moe_route_kernel(Logits, Bias, Weights, Ids, stride_l, routed_scaling,
                      E: tl.constexpr, BLOCK_E: tl.constexpr, TOP_K: tl.constexpr,
                      BLOCK_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                      BLOCK_G: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                      RENORM: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)                                  # [BLOCK_E]
    ok = e < E
    x = tl.load(Logits + t * stride_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        p = tl.exp(x - tl.max(x, 0))                           # padding: exp(-inf) = 0
        scores = p / tl.sum(p, 0)
    else:
        scores = 1.0 / (1.0 + tl.exp(-x))                      # padding: 1 / inf = 0
    choice = scores
    if HAS_BIAS:  # steers the choice only; the weights are the unbiased scores
        choice = scores + tl.load(Bias + e, mask=ok, other=0.0).to(tl.float32)
    choice = tl.where(ok, choice, float("-inf"))
    if TOPK_GROUP < N_GROUP:
        choice = _limit_groups(choice, e, E, BLOCK_E, N_GROUP, TOPK_GROUP, BLOCK_G, SOFTMAX)
        choice = tl.where(ok, choice, float("-inf"))
    k = tl.arange(0, BLOCK_K)                                  # [BLOCK_K]
    w = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        best = tl.argmax(choice, 0)
        w = tl.where(k == i, tl.sum(tl.where(e == best, scores, 0.0), 0), w)
        ids = tl.where(k == i, best.to(tl.int32), ids)
        choice = tl.where(e == best, float("-inf"), choice)
    if RENORM:
        w = w / (tl.sum(w, 0) + 1e-20)                         # lanes past TOP_K hold 0
    w = w * routed_scaling
    tl.store(Weights + t * TOP_K + k, w, mask=k < TOP_K)
    tl.store(Ids + t * TOP_K + k, ids, mask=k < TOP_K)


def _route_ok(f) -> bool:
    return on_cuda(f) and f.get("num_experts", 64) <= MAX_EXPERTS


@register("moe_route", backend="triton", priority=PRIORITY, supports=_route_ok)
def moe_route(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool,
              bias: torch.Tensor | None, n_group: int, topk_group: int,
              routed_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, k] float32, ids [T, k] int32); the reference's
    semantics (kernels/reference/moe.py)."""
    check(scoring in ("softmax", "sigmoid"),
          f"moe_route: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    check(router_logits.dim() == 2, "moe_route: router_logits must be [T, E]")
    t, e = router_logits.shape
    check(e <= MAX_EXPERTS, f"moe_route: at most {MAX_EXPERTS} experts, got {e}")
    check(1 <= top_k <= e, f"moe_route: top_k {top_k} must be in [1, {e}]")
    check(n_group >= 1 and e % n_group == 0 and 1 <= topk_group <= n_group,
          f"moe_route: {e} experts in {n_group} groups, keeping {topk_group}")
    check(bias is None or bias.shape == (e,), "moe_route: bias must be [E]")
    grouped = n_group > 1 and topk_group < n_group
    check(not grouped or topk_group * (e // n_group) >= top_k,
          f"moe_route: {topk_group} groups of {e // n_group} hold fewer than top_k {top_k}")
    check(not grouped or scoring == "softmax" or e // n_group >= 2,
          "moe_route: sigmoid groups are ranked by their top 2, groups need 2+ experts")
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)   # [T, k]
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)         # [T, k]
    if t == 0:
        return weights, ids
    _moe_route_kernel[(t,)](
        logits, bias if bias is not None else logits, weights, ids, logits.stride(0),
        float(routed_scaling), E=e, BLOCK_E=max(2, next_pow2(e)), TOP_K=top_k,
        BLOCK_K=max(2, next_pow2(top_k)), N_GROUP=n_group if grouped else 1,
        TOPK_GROUP=topk_group if grouped else 1, BLOCK_G=max(2, next_pow2(n_group)),
        SOFTMAX=scoring == "softmax", HAS_BIAS=bias is not None, RENORM=bool(renormalize),
        num_warps=1 if e <= 256 else 4, **pdl_launch(logits.device))
    return weights, ids
