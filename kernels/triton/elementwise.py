"""Row-wise Triton kernels: RMSNorm (+ fused residual add) and SiLU-and-mul."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.registry import register
from kernels.triton.common import PRIORITY, check, next_pow2, on_cuda
from kernels.triton.pdl import pdl_begin, pdl_launch


@triton.jit
def _rms_norm_kernel(X, R, W, Out, ResOut, stride_x, stride_r, stride_o, stride_ro, eps,
                     H: tl.constexpr, BLOCK_H: tl.constexpr, HAS_RES: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    ok = h < H
    x = tl.load(X + row * stride_x + h, mask=ok, other=0.0)                # [H]
    if HAS_RES:
        s = (x.to(tl.float32) + tl.load(R + row * stride_r + h, mask=ok, other=0.0).to(tl.float32))
        s = s.to(x.dtype)                                                  # rounded like HF
        tl.store(ResOut + row * stride_ro + h, s, mask=ok)
        x = s
    x32 = x.to(tl.float32)
    y = x32 * (1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / H + eps))
    if HAS_WEIGHT:
        y = y * tl.load(W + h, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + h, y.to(Out.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor, name: str) -> None:
    check(x.dim() == 2 and x.stride(1) == 1, f"{name}: expected a row-contiguous [T, H] tensor")


def _norm_warps(h: int) -> int:
    return 4 if h <= 2048 else 8


@register("rms_norm", backend="triton", priority=PRIORITY,
          supports=lambda f: on_cuda(f) and f.get("hidden", 0) <= 65536)
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [T, H], weight: [H] or None (a unit scale) -> [T, H]."""
    _rows(x, "rms_norm")
    t, h = x.shape
    out = torch.empty_like(x)
    _rms_norm_kernel[(t,)](x, x, weight if weight is not None else x, out, out, x.stride(0), 0,
                           out.stride(0), 0, eps, H=h, BLOCK_H=next_pow2(h), HAS_RES=False,
                           HAS_WEIGHT=weight is not None, num_warps=_norm_warps(h),
                           **pdl_launch(x.device))
    return out


@register("fused_add_rms_norm", backend="triton", priority=PRIORITY,
          supports=lambda f: on_cuda(f) and f.get("hidden", 0) <= 65536)
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x[T,H], residual[T,H]) -> (rms_norm(x + residual) [T,H], x + residual [T,H]);
    weight [H] or None (a unit scale)."""
    _rows(x, "fused_add_rms_norm")
    _rows(residual, "fused_add_rms_norm residual")
    t, h = x.shape
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    _rms_norm_kernel[(t,)](x, residual, weight if weight is not None else x, out, res_out,
                           x.stride(0), residual.stride(0), out.stride(0), res_out.stride(0),
                           eps, H=h, BLOCK_H=next_pow2(h), HAS_RES=True,
                           HAS_WEIGHT=weight is not None, num_warps=_norm_warps(h),
                           **pdl_launch(x.device))
    return out, res_out


@triton.jit
def swiglu(gate, up):
    """silu(gate) * up in fp32, the arithmetic every SwiGLU kernel shares (the fused epilogues
    stay bit-equal to the silu_and_mul kernel by calling this one)."""
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, I: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < I
    g = tl.load(X + row * stride_x + c, mask=ok, other=0.0).to(tl.float32)      # [BLOCK]
    u = tl.load(X + row * stride_x + I + c, mask=ok, other=0.0).to(tl.float32)  # [BLOCK]
    y = swiglu(g, u)
    tl.store(Out + row * stride_o + c, y.to(Out.dtype.element_ty), mask=ok)


@register("silu_and_mul", backend="triton", priority=PRIORITY, supports=on_cuda)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] -> [T, I]."""
    _rows(x, "silu_and_mul")
    t, two_i = x.shape
    inter = two_i // 2
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    block = min(1024, next_pow2(inter))
    _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](x, out, x.stride(0), out.stride(0),
                                                         I=inter, BLOCK=block, num_warps=4,
                                                         **pdl_launch(x.device))
    return out
