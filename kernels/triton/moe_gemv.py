"""Fused MoE for one token (batch-1 decode) as two GEMVs, no top-k sum launch.

At one token the grouped GEMMs of moe.py give each (token, expert) pair a 16-row MMA block with
one real row, read their weight tiles [K, N] column by column, and leave the routing-weighted
sum over the top-k (+ the shared experts' output) to a third launch. Here:

- `_up_kernel`: program (gate/up row block, pair j) streams BLOCK_N rows of w13[ids[j]] (whole
  rows, contiguous along K: every load coalesced) against x, gate row i and up row I + i
  interleaved in the block as gemv.py's SiLU epilogue has them, and stores
  inter[j, i] = silu(gate_i) * up_i in fp32 registers (moe.py's arithmetic, rounded once);
- `_down_kernel`: program (BLOCK_N output columns) streams those rows of w2[ids[j]] for every
  pair j in turn, sums weight_j * (w2[e_j] . inter[j]) in fp32 (+ shared), rounds once and
  stores the token's output: no per-pair buffer, no sum launch.

A pair of id >= E (an expert of another rank) reads nothing and adds nothing. The expert ids
come from the routing launch just before, so no weight is read before the PDL wait.

The shared experts (`shared_mlp`: their gate|up [2 Is, H] and down [H, Is]) run as S = Is / I
more pairs of weight 1, slice s being intermediate columns [s I, (s + 1) I): a SwiGLU MLP sums
over its intermediate columns, so its slices are experts of width I. That takes their two
GEMV launches out of a batch-1 layer (DeepSeek-V2-Lite: 2816 = 2 x 1408).

Measured (H200, copy 4,274 GB/s; DeepSeek-V2-Lite's experts, 64 x 2048 -> 1408, top-6, with
the shared experts' output): alone (graph replays, L2 flushed) the grouped kernels + sum took
39.25 us (62% of copy); the GEMVs at 16 x 1024 up / 8 x 512 down tiles 39.43, with 4-row down
programs over 1024-wide K steps 33.6 (72%), the up's tiles moving it by 2 us at most. In the
B=1 decode graph (1K keys, PDL on, `scripts/gpu_op_ablation.py --ablations moe_grouped`, 3
rounds) the first tiles lost, 2,612 -> 2,646 us a step, and the kept ones (8 x 2048 up, 8
warps; 4 x 1024 down, 4 warps; 3 stages) won, 2,608 -> 2,464 (1.058x); 4-row up programs were
within 6 us, 2-row down ones 39 us slower, one 2048-wide down step 14 us slower. Through the
daemon (`scripts/gpu_models`, batch-1 decode): 407.2 (the last stop's box) -> 433.8 tok/s,
49.8% of the bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton.common import check, interpreting
from kernels.triton.elementwise import swiglu
from kernels.triton.pdl import pdl_begin, pdl_launch


@dataclass(frozen=True)
class MoeGemvTiles:
    """Rows (block_n) x K step (block_k) a program loads at once, per kernel."""
    up_block_n: int = 8
    up_block_k: int = 2048
    up_warps: int = 8
    down_block_n: int = 4
    down_block_k: int = 1024
    down_warps: int = 4
    num_stages: int = 3


DEFAULT_TILES = MoeGemvTiles()
TINY_TILES = MoeGemvTiles(4, 16, 1, 4, 16, 1, 1)     # the CPU interpreter's small shapes


@triton.jit
def _rows_dot(rows, ok, A, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N] fp32: each row of `rows` (pointers to row starts, K contiguous elements;
    rows not `ok` read nothing) dotted with A[0:K]."""
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        a = tl.load(A + kk, mask=kk < K, other=0.0)
        w = tl.load(rows + kk[None, :], mask=ok[:, None] & (kk < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * a.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _up_kernel(X, W13, Ids, Inter, SW13, num_experts, stride_we, stride_wn, stride_sn, I,
               I_SHARED, K: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Inter[j, i] = silu(gate_i . x) * (up_i . x) for the BLOCK_N / 2 columns i of this
    program: pair j < TOP_K reads w13[Ids[j]] (gate row i, up row I + i); j = TOP_K + s the
    shared experts' slice s (gate row s I + i, up row I_SHARED + s I + i of SW13)."""
    pdl_begin(PDL)
    pid, j = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BLOCK_N)
    col = pid * (BLOCK_N // 2) + r // 2                                   # [BN] output column
    if j < TOP_K:
        e = tl.load(Ids + j)
        ok = col < tl.where(e < num_experts, I, 0)                        # no rows elsewhere
        rows = W13 + tl.minimum(e, num_experts - 1).to(tl.int64) * stride_we \
            + (col + (r % 2) * I).to(tl.int64)[:, None] * stride_wn       # [BN, 1]
    else:
        ok = col < I
        row = (j - TOP_K) * I + col + (r % 2) * I_SHARED
        rows = SW13 + row.to(tl.int64)[:, None] * stride_sn               # [BN, 1]
    dots = _rows_dot(rows, ok, X, K, BLOCK_N, BLOCK_K)                    # [BN]
    gate, up = tl.split(tl.reshape(dots, [BLOCK_N // 2, 2]))              # [BN/2] each
    c = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(Inter + j * I + c, swiglu(gate, up).to(Inter.dtype.element_ty),
             mask=c < I)


@triton.jit
def _down_kernel(Inter, W2, Ids, Weights, Shared, SW2, Out, num_experts, stride_we, stride_wn,
                 stride_sn, H, K: tl.constexpr, TOP_K: tl.constexpr, N_SHARED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SHARED: tl.constexpr,
                 PDL: tl.constexpr):
    """Out[n] = sum_j Weights[j] * (w2[Ids[j], n] . Inter[j]) + sum_s (SW2[n, sK:(s+1)K] .
    Inter[TOP_K + s]) (+ Shared[n]) for this program's BLOCK_N columns n, in fp32, rounded
    once."""
    pdl_begin(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)               # [BN]
    n_ok = n < H
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(Ids + j)
        rows = W2 + tl.minimum(e, num_experts - 1).to(tl.int64) * stride_we \
            + n.to(tl.int64)[:, None] * stride_wn                         # [BN, 1]
        dots = _rows_dot(rows, n < tl.where(e < num_experts, H, 0), Inter + j * K, K,
                         BLOCK_N, BLOCK_K)
        total += dots * tl.load(Weights + j).to(tl.float32)
    for s in tl.static_range(N_SHARED):
        rows = SW2 + n.to(tl.int64)[:, None] * stride_sn + s * K          # [BN, 1]
        total += _rows_dot(rows, n_ok, Inter + (TOP_K + s) * K, K, BLOCK_N, BLOCK_K)
    if HAS_SHARED:
        total += tl.load(Shared + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Out + n, total.to(Out.dtype.element_ty), mask=n_ok)


def moe_gemv_applies(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """One contiguous token, weights with contiguous rows (K last, stride 1)."""
    return x.shape[0] == 1 and x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1


def shared_slices(shared_mlp: tuple[torch.Tensor, torch.Tensor], inter: int) -> int:
    """How many I-wide slices the shared experts' intermediate is (their gate|up [2 Is, H] and
    down [H, Is], rows contiguous), so that moe_gemv runs them as that many more pairs of
    weight 1; 0 when Is is not a multiple of I or the rows are not contiguous."""
    w13, w2 = shared_mlp
    i_shared = w2.shape[1]
    fits = (i_shared % inter == 0 and w13.shape[0] == 2 * i_shared
            and w13.stride(1) == 1 and w2.stride(1) == 1)
    return i_shared // inter if fits else 0


def moe_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
             ids: torch.Tensor, shared: torch.Tensor | None = None,
             shared_mlp: tuple[torch.Tensor, torch.Tensor] | None = None,
             tiles: MoeGemvTiles | None = None) -> torch.Tensor:
    """fused_moe's contract for one token (x [1, H], w13 [E, 2I, H], w2 [E, H, I], weights /
    ids [1, k], shared [1, H] or shared_mlp's weights (`shared_slices` of them > 0)) without
    biases or GPT-OSS's activation -> [1, H]."""
    e, two_i, h = w13.shape
    inter, k = two_i // 2, ids.shape[1]
    check(moe_gemv_applies(x, w13, w2), "moe_gemv: one contiguous token and weights with "
          "contiguous rows")
    check(shared is None or (shared.shape == x.shape and shared.stride(1) == 1),
          "moe_gemv: shared must be [1, H] like x, contiguous")
    slices = 0 if shared_mlp is None else shared_slices(shared_mlp, inter)
    check(shared_mlp is None or (slices > 0 and shared is None),
          "moe_gemv: shared_mlp needs an intermediate size a multiple of the experts' and no "
          "shared output beside it")
    sw13, sw2 = shared_mlp if shared_mlp is not None else (w13[0], w2[0])
    tiles = tiles or (TINY_TILES if interpreting() else DEFAULT_TILES)
    ids_flat = ids.reshape(-1).contiguous()
    wflat = weights.reshape(-1).contiguous()
    inter_buf = torch.empty(k + slices, inter, dtype=x.dtype, device=x.device)  # [k + S, I]
    pdl = pdl_launch(x.device)
    _up_kernel[(triton.cdiv(inter, tiles.up_block_n // 2), k + slices)](
        x, w13, ids_flat, inter_buf, sw13, e, w13.stride(0), w13.stride(1), sw13.stride(0),
        inter, sw2.shape[1], K=h, TOP_K=k, BLOCK_N=tiles.up_block_n,
        BLOCK_K=tiles.up_block_k, num_warps=tiles.up_warps, num_stages=tiles.num_stages, **pdl)
    out = torch.empty_like(x)
    _down_kernel[(triton.cdiv(h, tiles.down_block_n),)](
        inter_buf, w2, ids_flat, wflat, x if shared is None else shared, sw2, out, e,
        w2.stride(0), w2.stride(1), sw2.stride(0), h, K=inter, TOP_K=k, N_SHARED=slices,
        BLOCK_N=tiles.down_block_n, BLOCK_K=tiles.down_block_k, HAS_SHARED=shared is not None,
        num_warps=tiles.down_warps, num_stages=tiles.num_stages, **pdl)
    return out
