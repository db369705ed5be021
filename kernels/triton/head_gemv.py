"""`head_matmul` on CUDA: one token by a per-head GEMV, more by torch.einsum (cuBLAS).

MLA's absorbed decode multiplies each head's query by its slice of kv_b_proj before the
attention (q_nope [T, H, Dn] x W_UK [H, Dn, L]) and each head's latent output by another after
it (o_latent [T, H, L] x W_UV^T [H, L, Dv]). At one token einsum runs them as cuBLAS batched
GEMMs (with a copy of the strided query before), kernels that take no part in programmatic
dependent launch, so the launches around them cannot start early either.

Here program (head h, BLOCK_N output columns) holds its head's whole [K, BLOCK_N] weight tile:
it reads the tile into registers before its PDL wait (weights are never written while
serving: pdl.py), then the head's K inputs, and reduces over K. So the kernel's own weight
read overlaps the launch before it; what is left after the wait is one small load from L2, a
reduction and a store. Weights of any strides: the tile's loads follow its contiguous axis
(W_UK's output columns, W_UV^T's K).

H200, DeepSeek-V2-Lite's B=1 decode graph (1K keys, PDL on; `scripts/gpu_op_ablation.py
--ablations head_einsum`, 3 rounds): einsum 2,471 -> this kernel 2,379 us a step (1.039x; the
ablation that takes both products out saved 229). A tensor-core version (16-row tiles, the K
loop after the wait; twelfth session) had made the step slower, 2,709 -> 2,944.

`merged_head_gemv`: W_UV's product for one token whose MLA decode ran in splits, the splits'
merge inside it (split_kv.merge_partials), so the merge launch between the two is gone. Every
program merges its head's partials itself (the whole latent: its K). Same graph, same call
(`--ablations merge_apart`, 3 rounds, 16 splits used): the merge in a launch of its own
2,022 us a step; merged at head_gemv's tiles ([512, 16], 4 warps, 8 splits a load) 2,056,
slower; at [512, 32] tiles, 8 warps and 32 splits a load (the splits in one load) 1,994;
[512, 64] tiles with 16 warps 1,992, 8 warps and 16 splits a load 2,028; a head a program
([512, 128], 16 warps) 2,015.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.registry import register
from kernels.triton.common import PRIORITY, next_pow2, on_cuda_half, per_batch
from kernels.triton.pdl import pdl_begin, pdl_launch
from kernels.triton.split_kv import MAX_DECODE_SPLITS, merge_partials

TILE_ELEMS = 8192          # weight elements a program holds: 64 a thread at 4 warps
MAX_K = TILE_ELEMS // 16   # a 16-column tile at most: longer K takes einsum
# merged_head_gemv (module doc): a [512, 32] weight tile at DeepSeek's latent, 8 warps, and up
# to 32 splits' partials in one load
MERGED_TILE_ELEMS = 16384   # weight elements a program holds
MERGED_CHUNK_ELEMS = 16384  # partial-output elements one of its loads brings in
MERGED_WARPS = 8


@triton.jit
def head_gemv_program(h, pid_n, X, W, Out, N, K, stride_xh, stride_xk, stride_wh, stride_wk,
                      stride_wn, stride_oh, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                      PDL: tl.constexpr):
    """Out[h, n] = sum_k X[h, k] * W[h, k, n] for the BLOCK_N columns n of block pid_n."""
    k = tl.arange(0, BLOCK_K)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, n_ok = k < K, n < N
    w = tl.load(W + h * stride_wh + k[:, None] * stride_wk + n[None, :] * stride_wn,
                mask=k_ok[:, None] & n_ok[None, :], other=0.0)              # [BK, BN]
    pdl_begin(PDL)          # X is the launch before's output: read only after the wait
    x = tl.load(X + h * stride_xh + k * stride_xk, mask=k_ok, other=0.0)     # [BK]
    y = tl.sum(w.to(tl.float32) * x.to(tl.float32)[:, None], axis=0)         # [BN]
    tl.store(Out + h * stride_oh + n, y.to(Out.dtype.element_ty), mask=n_ok)


@triton.jit
def _head_gemv_kernel(X, W, Out, N, K, stride_xh, stride_xk, stride_wh, stride_wk, stride_wn,
                      stride_oh, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                      PDL: tl.constexpr):
    """Program (head, column block): `head_gemv_program`."""
    head_gemv_program(tl.program_id(0), tl.program_id(1), X, W, Out, N, K, stride_xh,
                      stride_xk, stride_wh, stride_wk, stride_wn, stride_oh, BLOCK_K, BLOCK_N,
                      PDL)


MERGED_PER_BATCH = ("num_splits", "stride_poh", "stride_plh")   # vary with the split count


@triton.jit(**per_batch(ints=MERGED_PER_BATCH))
def _merged_head_gemv_kernel(PartO, PartL, W, Out, num_splits, N, stride_poh, stride_pos,
                             stride_plh, stride_wh, stride_wk, stride_wn, stride_oh,
                             K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                             CHUNK_S: tl.constexpr, PDL: tl.constexpr):
    """Out[h, n] = sum_k x_h[k] * W[h, k, n], x_h the merge of head h's split-KV partials
    (split_kv.py's layout), rounded to Out's dtype as the merge's own output would be."""
    h, pid_n = tl.program_id(0), tl.program_id(1)
    k = tl.arange(0, K)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w = tl.load(W + h * stride_wh + k[:, None] * stride_wk + n[None, :] * stride_wn,
                mask=n_ok[None, :], other=0.0)                              # [K, BN]
    pdl_begin(PDL)          # the partials are the launch before's output
    x = merge_partials(PartO + h * stride_poh, PartL + h * stride_plh, num_splits, stride_pos,
                       k, k < K, 0.0, BLOCK_S, CHUNK_S, False)             # [K] fp32
    x = x.to(Out.dtype.element_ty).to(tl.float32)
    y = tl.sum(w.to(tl.float32) * x[:, None], axis=0)                     # [BN]
    tl.store(Out + h * stride_oh + n, y.to(Out.dtype.element_ty), mask=n_ok)


def head_gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One token, each head's K within one tile, the weight of x's dtype."""
    return (x.dim() == 3 and x.shape[0] == 1 and weight.dim() == 3
            and weight.shape[:2] == x.shape[1:] and x.shape[2] <= MAX_K
            and weight.dtype == x.dtype)


def head_gemv_launch(x: torch.Tensor, weight: torch.Tensor
                     ) -> tuple[tuple, dict, int, torch.Tensor]:
    """(arguments, constexprs, column blocks) of `head_gemv_program` for x [1, H, K] and
    weight [H, K, N], and the output [1, H, N] it writes."""
    _, h, k = x.shape
    n = weight.shape[2]
    block_k = max(16, next_pow2(k))
    block_n = max(16, min(next_pow2(n), TILE_ELEMS // block_k))
    out = torch.empty(1, h, n, dtype=x.dtype, device=x.device)
    args = (x, weight, out, n, k, x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
            weight.stride(2), out.stride(1))
    return args, dict(BLOCK_K=block_k, BLOCK_N=block_n), triton.cdiv(n, block_n), out


def head_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [1, H, K], weight: [H, K, N] (any strides) -> [1, H, N]."""
    args, constexprs, blocks, out = head_gemv_launch(x, weight)
    _head_gemv_kernel[(x.shape[1], blocks)](*args, **constexprs, num_warps=4,
                                           **pdl_launch(x.device))
    return out


def merged_head_gemv_applies(part_o: torch.Tensor, weight: torch.Tensor,
                             dtype: torch.dtype) -> bool:
    """One token's split partials [1, H, S, K] (K a power of two within one tile, the
    columns contiguous) and a weight [H, K, N] of the output's dtype."""
    _, h, _, k = part_o.shape
    return (part_o.shape[0] == 1 and part_o.stride(3) == 1 and weight.dim() == 3
            and weight.shape[:2] == (h, k) and k == next_pow2(k) and 16 <= k <= MAX_K
            and weight.dtype == dtype)


def merged_head_gemv(part_o: torch.Tensor, part_l: torch.Tensor, weight: torch.Tensor
                     ) -> torch.Tensor:
    """part_o: [1, H, S, K] fp32, part_l: [1, H, S] (split_kv.py's partials of one token),
    weight: [H, K, N] (any strides) -> [1, H, N] in the weight's dtype: head_gemv of the merged
    partials in one launch, no merge launch before it."""
    _, h, num_splits, k = part_o.shape
    n = weight.shape[2]
    block_n = max(16, min(next_pow2(n), MERGED_TILE_ELEMS // k))
    block_s = max(MAX_DECODE_SPLITS, next_pow2(num_splits))
    out = torch.empty(1, h, n, dtype=weight.dtype, device=weight.device)
    _merged_head_gemv_kernel[(h, triton.cdiv(n, block_n))](
        part_o, part_l, weight, out, num_splits, n, part_o.stride(1), part_o.stride(2),
        part_l.stride(1), weight.stride(0), weight.stride(1), weight.stride(2), out.stride(1),
        K=k, BLOCK_N=block_n, BLOCK_S=block_s,
        CHUNK_S=min(block_s, max(2, MERGED_CHUNK_ELEMS // k)), num_warps=MERGED_WARPS,
        **pdl_launch(weight.device))
    return out


@register("head_matmul", backend="triton", priority=PRIORITY, supports=on_cuda_half)
def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The reference's contract (kernels/reference/linear.py): one token by the GEMV above,
    more by einsum."""
    if head_gemv_applies(x, weight):
        return head_gemv(x, weight)
    return torch.einsum("thk,hkn->thn", x, weight)
