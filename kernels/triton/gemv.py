"""`linear` on CUDA: one row (a batch-1 decode step) by a GEMV kernel, more rows by cuBLAS.

At one row a decode step's linear layers only stream their weights; cuBLAS picks split-K
kernels for the narrow ones (o_proj, down_proj) and pays a reduce kernel after each, and
reaches 59-78% of copy bandwidth on Llama-3.1-8B's o and qkv. The GEMV gives each program
BLOCK_N whole rows of W (contiguous along K, so every load is coalesced) and enough programs
to fill the GPU without splitting K: no reduce, no workspace. H200, `scripts/gpu_gemv_bench.py`
(graph replays, weights read from HBM; copy 4.27 TB/s), us a call cuBLAS -> GEMV: qkv 15.0 ->
14.0, o 13.3 -> 10.4, gate_up 56.3 -> 55.1, down 31.9 -> 28.7, lm_head 251 -> 236: about
0.28 ms of a 4.7 ms batch-1 step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.registry import register
from kernels.triton.common import PRIORITY, on_cuda
from kernels.triton.elementwise import fused_add_rms_norm, rms_norm
from kernels.triton.elementwise import silu_and_mul as silu_and_mul_kernel


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 1024
    num_warps: int = 8
    num_stages: int = 2


# Wide outputs (gate_up, lm_head) have programs to spare and take short K steps; narrow ones
# (qkv, o, down) need more bytes in flight per program (gpu_gemv_bench.py's best per shape).
WIDE_N = 16384
WIDE = GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=2)
NARROW = GemvConfig(block_n=16, block_k=1024, num_warps=8, num_stages=2)


# The few-rows kernel's MMA height; linear() sends it up to GEMV_ROWS rows
FEW_ROWS = 16
GEMV_ROWS = 1


def gemv_config(n: int, k: int) -> GemvConfig:
    """The tiles of an [N, K] weight's GEMV."""
    return WIDE if n >= WIDE_N else NARROW


@triton.jit
def _gemv_kernel(X, W, B, Out, N, K, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)                          # [BN]
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)                                          # [BK]
    rows = W + n.to(tl.int64)[:, None] * stride_w                      # [BN, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        if EVEN_K:
            x = tl.load(X + kk)
            w = tl.load(rows + kk[None, :], mask=n_ok[:, None], other=0.0,
                        eviction_policy="evict_first")
        else:
            k_ok = kk < K
            x = tl.load(X + kk, mask=k_ok, other=0.0)
            w = tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)                                            # [BN]
    if HAS_BIAS:
        y += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Out + n, y.to(Out.dtype.element_ty), mask=n_ok)


@triton.jit
def _few_rows_kernel(X, W, B, Out, M, N, K, stride_x, stride_w, stride_o,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """M <= BLOCK_M rows at once: each W tile is read once for all of them (an MMA of
    BLOCK_M x BLOCK_N, mostly padding; the step is bound by the weight reads)."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)                          # [BN]
    n_ok = n < N
    m = tl.arange(0, BLOCK_M)                                          # [BM]
    m_ok = m < M
    k = tl.arange(0, BLOCK_K)                                          # [BK]
    xrows = X + m.to(tl.int64)[:, None] * stride_x                     # [BM, 1]
    wrows = W + n.to(tl.int64)[:, None] * stride_w                     # [BN, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        k_ok = (kk < K) | EVEN_K
        x = tl.load(xrows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(wrows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + m.to(tl.int64)[:, None] * stride_o + n[None, :],
             acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _norm_gemv_kernel(X, R, G, W, B, Out, ResOut, N, K, stride_w, eps,
                      HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """One row: y = W @ (rms_norm(x + r) * g) (+ b). The norm's scale is one number for the
    row, so it factors out of the product: each program sums x^2 while it streams its rows of
    W against x * g, and scales its outputs at the end. Program 0 writes x + r.
    SILU_MUL: W is [2N, K] (gate rows, then up rows), the output silu(gate) * up [N]; a
    program's BLOCK_N rows are BLOCK_N / 2 gate rows and the matching up rows, so it holds
    one accumulator, as the plain GEMV does."""
    pid = tl.program_id(0)
    OUTS: tl.constexpr = BLOCK_N // 2 if SILU_MUL else BLOCK_N
    r = tl.arange(0, BLOCK_N)
    n = pid * OUTS + r % OUTS                                          # [BN] output index
    n_ok = n < N
    row = n + (r // OUTS) * N if SILU_MUL else n                       # [BN] row of W
    k = tl.arange(0, BLOCK_K)                                          # [BK]
    rows = W + row.to(tl.int64)[:, None] * stride_w                    # [BN, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        k_ok = (kk < K) | EVEN_K
        x = tl.load(X + kk, mask=k_ok, other=0.0)
        if HAS_RES:  # the sum rounded to x's dtype, as fused_add_rms_norm stores it
            x = (x.to(tl.float32) + tl.load(R + kk, mask=k_ok, other=0.0).to(tl.float32)
                 ).to(X.dtype.element_ty)
            first = tl.zeros((BLOCK_K,), dtype=tl.int32) + pid == 0  # a vector mask: the
            tl.store(ResOut + kk, x, mask=k_ok & first)               # interpreter's rule
        x = x.to(tl.float32)
        squares += x * x
        xg = x * tl.load(G + kk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * xg[None, :]
    inv = 1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps)
    y = tl.sum(acc, axis=1) * inv                                      # [BN]
    if HAS_BIAS:
        y += tl.load(B + row, mask=n_ok, other=0.0).to(tl.float32)
    if SILU_MUL:
        gate, up = tl.split(tl.permute(tl.reshape(y, (2, OUTS)), (1, 0)))   # [OUTS] each
        out = pid * OUTS + tl.arange(0, OUTS)
        tl.store(Out + out, (gate / (1.0 + tl.exp(-gate)) * up).to(Out.dtype.element_ty),
                 mask=out < N)
    else:
        tl.store(Out + n, y.to(Out.dtype.element_ty), mask=n_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x: [M, K] (row-contiguous, M <= FEW_ROWS), weight: [N, K] (row-contiguous), bias: [N]
    -> [M, N]: one row by the GEMV kernel, a few by the few-rows kernel."""
    n, k = weight.shape
    config = config or gemv_config(n, k)
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k or not 1 <= m <= FEW_ROWS or x.stride(1) != 1 \
            or weight.stride(1) != 1:
        raise ValueError(f"gemv: expected x [<= {FEW_ROWS}, {k}] and a weight, both "
                         f"row-contiguous, got x {tuple(x.shape)} strides {x.stride()} and "
                         f"weight strides {weight.stride()}")
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config.block_n),)
    b = bias if bias is not None else out
    launch = dict(HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                  EVEN_K=k % config.block_k == 0, num_warps=config.num_warps,
                  num_stages=config.num_stages)
    if m == 1 and x.is_contiguous():
        _gemv_kernel[grid](x, weight, b, out, n, k, weight.stride(0), **launch)
    else:
        _few_rows_kernel[grid](x, weight, b, out, m, n, k, x.stride(0), weight.stride(0),
                               out.stride(0), BLOCK_M=FEW_ROWS, **launch)
    return out


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 rows: int = GEMV_ROWS) -> bool:
    """Up to `rows` row-contiguous rows, a row-contiguous weight of their dtype (no quantized
    weights)."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= min(rows, FEW_ROWS) and x.stride(1) == 1
            and weight.dim() == 2
            and weight.dtype == x.dtype and weight.stride(1) == 1
            and x.shape[1] == weight.shape[1]
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())))


@register("linear", backend="triton", priority=PRIORITY,
          supports=lambda f: on_cuda(f) and f["dtype"] in (torch.bfloat16, torch.float16))
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear's contract; one row by the GEMV, anything else by cuBLAS."""
    if gemv_applies(x, weight, bias):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
              eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
              silu_and_mul: bool = False, config: GemvConfig | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm_linear of one row in one kernel: x, residual [1, K] -> ([1, N], [1, K])
    ([1, N / 2] with silu_and_mul)."""
    n, k = weight.shape
    config = config or gemv_config(n, k)
    outs = n // 2 if silu_and_mul else n
    out = torch.empty((1, outs), device=x.device, dtype=x.dtype)
    res_out = torch.empty_like(x) if residual is not None else x
    grid = (triton.cdiv(outs, config.block_n // 2 if silu_and_mul else config.block_n),)
    _norm_gemv_kernel[grid](
        x, residual if residual is not None else x, norm_weight, weight,
        bias if bias is not None else out, out, res_out, outs, k, weight.stride(0), eps,
        HAS_RES=residual is not None, HAS_BIAS=bias is not None, SILU_MUL=silu_and_mul,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out, res_out


@register("add_rms_norm_linear", backend="triton", priority=PRIORITY,
          supports=lambda f: on_cuda(f) and f["dtype"] in (torch.bfloat16, torch.float16))
def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None,
                        norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                        bias: torch.Tensor | None = None, silu_and_mul: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's contract. One contiguous row (a batch-1 decode step): one kernel, the
    norm inside the GEMV (and the activation after it); more rows: the norm kernel, then
    `linear` (then the activation kernel)."""
    one_row = (gemv_applies(x, weight, bias, rows=1) and x.is_contiguous()
               and norm_weight.is_contiguous()
               and not (silu_and_mul and weight.shape[0] % 2)
               and (residual is None or (residual.shape == x.shape and residual.is_contiguous())))
    if one_row:
        return norm_gemv(x, residual, norm_weight, eps, weight, bias, silu_and_mul)
    if residual is None:
        normed, residual = rms_norm(x, norm_weight, eps), x
    else:
        normed, residual = fused_add_rms_norm(x, residual, norm_weight, eps)
    y = linear(normed, weight, bias)
    return (silu_and_mul_kernel(y) if silu_and_mul else y), residual
