"""`linear` on CUDA: one row (a batch-1 decode step) by a GEMV kernel, 2-64 rows by the
few-rows kernel (few_rows.py) where it has tiles for the shape, the rest by cuBLAS;
`linear_silu_and_mul`, a SwiGLU MLP's gate|up with its SiLU in the same GEMV's (or few-rows
kernel's) epilogue;
`rms_norm_linear`, the RMS norm in its loads.

At one row a decode step's linear layers only stream their weights; cuBLAS picks split-K
kernels for the narrow ones (o_proj, down_proj) and pays a reduce kernel after each, and
reaches 59-78% of copy bandwidth on Llama-3.1-8B's o and qkv. The GEMV gives each program
BLOCK_N whole rows of W (contiguous along K, so every load is coalesced) and enough programs
to fill the GPU without splitting K: no reduce, no workspace. H200, `scripts/gpu_gemv_bench.py`
(graph replays, weights read from HBM; copy 4.27 TB/s), us a call cuBLAS -> GEMV: qkv 15.0 ->
14.0, o 13.3 -> 10.4, gate_up 56.3 -> 55.1, down 31.9 -> 28.7, lm_head 251 -> 236; the
Llama-3.1-8B batch-1 decode graph 5.35 -> 4.91 ms (docs/KERNELS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.reference.norm import pre_norm
from kernels.registry import register
from kernels.triton.common import HALF_DTYPES, PRIORITY, on_cuda, on_cuda_half
from kernels.triton.elementwise import fused_add_rms_norm, rms_norm, silu_and_mul, swiglu
from kernels.triton.few_rows import few_rows_applies, few_rows_linear
from kernels.triton.pdl import pdl_begin, pdl_launch, prefetch_l2


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 1024
    num_warps: int = 8
    num_stages: int = 2


# Wide outputs (gate_up, lm_head) have programs to spare and take short K steps; narrow ones
# (qkv, o, down) need more bytes in flight per program; small weights of K <= 2048
# (DeepSeek-V2-Lite's q, kv_a, o and shared gate_up: 576-5632 rows) have too few rows for
# 16-row programs to fill the GPU (kv_a: 36 programs) and take 4-row programs of one K step
# (gpu_gemv_bench.py's best per shape; H200, us a call: kv_a 2.90 -> 1.85, o 4.40 -> 3.39,
# q 5.48 -> 4.59, shared gate_up 8.41 -> 7.19; the shared down, K = 2816, would take two
# steps, the second part-masked: 5.03 -> 5.22, so it stays); taller than wide ones (the 8B's
# qkv) take half as long K steps (qkv 15.13 -> 13.15 us; o and down stay).
WIDE_N = 16384
SMALL_WEIGHT = 12 << 20    # elements
WIDE = GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=2)
NARROW = GemvConfig(block_n=16, block_k=1024, num_warps=8, num_stages=2)
TALL = GemvConfig(block_n=16, block_k=512, num_warps=8, num_stages=2)
SMALL = GemvConfig(block_n=4, block_k=2048, num_warps=4, num_stages=2)
# A wide GEMV with the norm in its loads takes WIDE too. Every program re-reads the row, the
# residual and the norm weight, so fewer, taller programs were tried for the 8B's gate|up
# (twenty-second session, H200, `gpu_gemv_bench.py --fold`, us a call against the norm kernel
# then the plain GEMV, 56.7): 64x128 w8 72.8, 64x256 w4 59.0, 32x128 w8 63.1, 32x256 w4 65.5;
# in the decode graph 64x128 cost +533 us a step where WIDE's fold cost +139. None wins, so the
# dense MLP's norm folds only with its scale in gate|up's weight (layers/norm.py SCALED_KINDS:
# no norm weight to load, NORM_WEIGHT off).


@dataclass(frozen=True)
class RowNorm:
    """The RMS norm a GEMV applies to its row first: weight [K] (None: a unit scale, the
    norm's own having gone into the GEMV's weight), eps, and the residual [1, K] added before
    it (None: the first layer's) with residual_out [1, K] receiving the sum."""
    weight: torch.Tensor | None
    eps: float
    residual: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None


def gemv_config(n: int, k: int, norm: bool = False) -> GemvConfig:
    """The tiles of an [N, K] weight's GEMV (`norm`: with the RMS norm in its loads)."""
    if n >= WIDE_N:
        return WIDE
    if n * k <= SMALL_WEIGHT and k <= SMALL.block_k:
        return SMALL
    return TALL if n > k else NARROW


@triton.jit
def _norm_input(x, R, G, ResOut, kk, k_ok, K, first, ss, HAS_RES: tl.constexpr,
                HAS_WEIGHT: tl.constexpr):
    """A chunk of X made the RMS norm's input inside the GEMV: + the residual's chunk (rounded
    to X's dtype as fused_add_rms_norm stores it; the `first` program stores it in ResOut),
    its squares added to ss, times the norm weight G unless the GEMV's weight holds it (the
    1 / rms scale multiplies the dot products at the end) -> (float32 chunk, ss)."""
    if HAS_RES:
        r = tl.load(R + kk, mask=k_ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        # the first program's only (a vector mask: the interpreter takes no scalar in one)
        tl.store(ResOut + kk, x, mask=k_ok & (kk < tl.where(first, K, 0)))
    xf = x.to(tl.float32)
    ss += xf * xf
    if HAS_WEIGHT:
        xf = xf * tl.load(G + kk, mask=k_ok, other=0.0).to(tl.float32)
    return xf, ss


@triton.jit
def _gemv_kernel(X, W, B, Out, R, G, ResOut, N, K, stride_w, eps,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr, NORM: tl.constexpr,
                 HAS_RES: tl.constexpr, NORM_WEIGHT: tl.constexpr, PDL: tl.constexpr):
    """Out[n] = W[n] . X (+ B[n]) for BLOCK_N rows n a program. SILU_MUL: W is N gate rows
    then N up rows, and a program's rows are BLOCK_N / 2 (gate j, up j) pairs, interleaved,
    so that Out[j] = silu(gate_j) * up_j is its epilogue: the same rows, tiles and sums as
    the plain GEMV, each rounded to Out's dtype as the plain one stores it, and the
    silu_and_mul kernel's arithmetic on them (bit-equal to the two kernels, one launch).
    NORM: X is RMS-normed first (weight G, epsilon eps; HAS_RES: X + R, stored in ResOut by
    program 0): every program reads all of X anyway, so each sums its squares as it goes
    and scales its dot products by 1 / rms at the end (the normed X is not rounded to X's
    dtype between the two, as the separate norm kernel's output is); NORM_WEIGHT: times G,
    else W holds the norm's scale."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_N)
    if SILU_MUL:
        j = pid * (BLOCK_N // 2) + r // 2                              # [BN] output column
        n = j + (r % 2) * N                                            # gate row j, up row N + j
        n_ok = j < N
    else:
        n = pid * BLOCK_N + r                                          # [BN]
        n_ok = n < N
    k = tl.arange(0, BLOCK_K)                                          # [BK]
    rows = W + n.to(tl.int64)[:, None] * stride_w                      # [BN, 1]
    if PDL:
        # Weights are never written while serving: the first tile's 128-byte lines stream
        # into L2 while the kernel that writes X ends (pdl.py).
        lines = tl.arange(0, BLOCK_K // 64) * 64
        safe_rows = W + tl.where(n_ok, n, 0).to(tl.int64)[:, None] * stride_w
        prefetch_l2(safe_rows + tl.where(lines < K, lines, 0)[None, :])
    pdl_begin(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)                        # NORM: sum of squares
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        k_ok = kk < K
        if EVEN_K:
            x = tl.load(X + kk)
            w = tl.load(rows + kk[None, :], mask=n_ok[:, None], other=0.0,
                        eviction_policy="evict_first")
        else:
            x = tl.load(X + kk, mask=k_ok, other=0.0)
            w = tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
        if NORM:
            x, ss = _norm_input(x, R, G, ResOut, kk, k_ok, K, pid == 0, ss, HAS_RES,
                                NORM_WEIGHT)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)                                            # [BN]
    if NORM:
        y = y / tl.sqrt(tl.sum(ss, 0) / K + eps)
    if HAS_BIAS:
        y += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)
    if SILU_MUL:
        gate, up = tl.split(tl.reshape(y.to(Out.dtype.element_ty).to(tl.float32),
                                       [BLOCK_N // 2, 2]))             # [BN/2] each
        j = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(Out + j, swiglu(gate, up).to(Out.dtype.element_ty),
                 mask=j < N)
    else:
        tl.store(Out + n, y.to(Out.dtype.element_ty), mask=n_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, silu_mul: bool = False,
         norm: RowNorm | None = None) -> torch.Tensor:
    """x: [1, K] (contiguous), weight: [N, K] (row-contiguous), bias: [N] -> [1, N].
    silu_mul: weight is gate rows then up rows (N even) -> silu(gate) * up [1, N / 2].
    norm: x is RMS-normed first (its residual added and stored: see RowNorm)."""
    n, k = weight.shape
    config = config or gemv_config(n, k, norm is not None)
    if x.shape != (1, k) or not x.is_contiguous() or weight.stride(1) != 1:
        raise ValueError(f"gemv: expected x [1, {k}] contiguous and a row-contiguous weight, "
                         f"got x {tuple(x.shape)} and weight strides {weight.stride()}")
    if silu_mul and n % 2:
        raise ValueError(f"gemv: silu_mul needs gate and up rows of equal count, got {n} rows")
    width = n // 2 if silu_mul else n
    out = torch.empty((1, width), device=x.device, dtype=x.dtype)
    has_res = norm is not None and norm.residual is not None
    residual, res_out = (norm.residual, norm.residual_out) if has_res else (x, x)
    norm_weight = norm.weight if norm is not None and norm.weight is not None else None
    grid = (triton.cdiv(n, config.block_n),)
    _gemv_kernel[grid](x, weight, bias if bias is not None else out, out, residual,
                       norm_weight if norm_weight is not None else x, res_out, width, k,
                       weight.stride(0), norm.eps if norm is not None else 0.0,
                       HAS_BIAS=bias is not None, BLOCK_N=config.block_n,
                       BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
                       SILU_MUL=silu_mul, NORM=norm is not None, HAS_RES=has_res,
                       NORM_WEIGHT=norm_weight is not None,
                       num_warps=config.num_warps, num_stages=config.num_stages,
                       **pdl_launch(x.device))
    return out


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """One contiguous row, a row-contiguous weight of its dtype (no quantized weights)."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous() and weight.dim() == 2
            and weight.dtype == x.dtype and weight.stride(1) == 1
            and x.shape[1] == weight.shape[1]
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())))


@register("linear", backend="triton", priority=PRIORITY, supports=on_cuda_half)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear's contract; one row by the GEMV, 2-64 by the few-rows kernel where it has
    tiles, anything else by cuBLAS."""
    if gemv_applies(x, weight, bias):
        return gemv(x, weight, bias)
    if few_rows_applies(x, weight, bias):
        return few_rows_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# 2-64 rows take the few-rows kernel's SILU_MUL epilogue where `linear` takes that kernel
# (False: the kernel, then silu_and_mul; scripts/gpu_op_ablation.py's few_rows_silu_apart)
FEW_ROWS_SILU = True


@register("linear_silu_and_mul", backend="triton", priority=PRIORITY, supports=on_cuda)
def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(linear(x, weight, bias)); one 16-bit row in one GEMV launch, 2-64 in one
    few-rows launch where it has tiles (their SILU_MUL epilogues), anything else by `linear`
    and the silu_and_mul kernel, as the two ops would run it."""
    if x.dtype in HALF_DTYPES and weight.shape[0] % 2 == 0:
        if gemv_applies(x, weight, bias):
            return gemv(x, weight, bias, silu_mul=True)
        if FEW_ROWS_SILU and few_rows_applies(x, weight, bias):
            return few_rows_linear(x, weight, bias, silu_mul=True)
    return silu_and_mul(linear(x, weight, bias) if x.dtype in HALF_DTYPES
                        else F.linear(x, weight, bias))


def _row_norm_applies(x: torch.Tensor, residual: torch.Tensor | None,
                      norm_weight: torch.Tensor | None) -> bool:
    return ((residual is None or (residual.shape == x.shape and residual.is_contiguous()
                                  and residual.dtype == x.dtype))
            and (norm_weight is None or (norm_weight.shape == (x.shape[-1],)
                                         and norm_weight.is_contiguous())))


@register("rms_norm_linear", backend="triton", priority=PRIORITY, supports=on_cuda_half)
def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None,
                    norm_weight: torch.Tensor | None, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, silu_mul: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's contract (kernels/reference/linear.py). One 16-bit row: one GEMV
    launch, the norm in its loads (`_gemv_kernel`'s NORM: the norm kernel's launch gone;
    the normed row is not rounded to 16 bits before the dot products). Anything else: the
    norm kernel, then `linear` or `linear_silu_and_mul`, as the separate ops run it."""
    if (gemv_applies(x, weight, bias) and _row_norm_applies(x, residual, norm_weight)
            and not (silu_mul and weight.shape[0] % 2)):
        out_residual = torch.empty_like(x) if residual is not None else x
        norm = RowNorm(norm_weight, eps, residual, out_residual)
        return gemv(x, weight, bias, silu_mul=silu_mul, norm=norm), out_residual
    normed, residual = pre_norm(x, residual, norm_weight, eps, rms_norm, fused_add_rms_norm)
    project = linear_silu_and_mul if silu_mul else linear
    return project(normed, weight, bias), residual


