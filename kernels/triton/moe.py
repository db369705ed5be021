"""Fused MoE in Triton: align (token, expert) pairs by expert, a grouped GEMM with SiLU-and-mul
fused (x @ w13[e].T -> silu(gate) * up), then the grouped down projection scaled by each pair's
routing weight, summed over the top-k (a third, small kernel).

Alignment happens on the device with torch ops and no host sync: pairs are sorted by expert and
each expert's segment is padded to a multiple of BLOCK_M, so every M-block of the sorted order
belongs to one expert. The grid is sized by the worst case (T*k + E*(BLOCK_M-1) rows); blocks
past the last expert do no work. With at most PAIR_BLOCKS_MAX pairs (batch-1 decode) there is
no alignment: block p serves pair p alone, its expert read from the routing ids."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.registry import register
from kernels.triton.common import PRIORITY, check, interpreting, on_cuda_half, per_batch
# Up to this many (token, expert) pairs each pair gets an M block of its own, so the ~12 small
# launches of align_by_expert are skipped (batch-1 decode: T=1 x top-6). Distinct experts per
# block then, so no expert's weights are read twice as long as a token's k experts differ.
PAIR_BLOCKS_MAX = 8


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ids: [T, k] -> sorted_pairs [NB*BLOCK_M] int32 (pair index t*k+j, or T*k as padding),
    block_expert [NB] int32 (>= num_experts for idle blocks), NB. Pairs of id num_experts
    (another rank's expert) get blocks of their own, which are idle: their outputs are 0."""
    flat = ids.reshape(-1).long()                                            # [N]
    n = flat.shape[0]
    buckets = num_experts + 1                                                # + not here
    nb = triton.cdiv(n + buckets * (block_m - 1), block_m)
    counts = torch.zeros(buckets, dtype=torch.long, device=ids.device)
    counts.index_add_(0, flat, torch.ones_like(flat))                        # [E]
    padded = (counts + block_m - 1) // block_m * block_m                     # [E + 1]
    cum_pad = torch.cumsum(padded, 0)                                        # [E + 1]
    order = torch.argsort(flat, stable=True)                                 # [N]
    sorted_e = flat[order]                                                   # [N]
    rank = torch.arange(n, device=ids.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    dest = (cum_pad - padded)[sorted_e] + rank                               # [N]
    pairs = torch.full((nb * block_m,), n, dtype=torch.int32, device=ids.device)
    pairs[dest] = order.to(torch.int32)
    starts = torch.arange(nb, device=ids.device) * block_m                   # [NB]
    block_expert = torch.searchsorted(cum_pad, starts, right=True).to(torch.int32)
    return pairs, block_expert, nb


@triton.jit
def _expert_block(Pairs, BlockExpert, W, num_pairs, num_experts, stride_we, N: tl.constexpr,
                  K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PAIR_BLOCKS: tl.constexpr):
    """What a grouped-GEMM program works on: (rows [M] of the padded order, pair [M] (num_pairs
    for padding), ok [M] (a real pair), output columns n [N], k offsets kk [K], k_end (0 for an
    idle block), its expert's weights W[e]).

    The 1-D grid runs N blocks fastest, so the programs resident together share one expert's
    rows (A) and weights (B) in L2; with M fastest each A block was re-read from DRAM once per
    N block. PAIR_BLOCKS: block p holds pair p alone and BlockExpert is the flat expert ids."""
    n_blocks: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    pid_m, pid_n = pid // n_blocks, pid % n_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                          # [M]
    if PAIR_BLOCKS:
        e = tl.load(BlockExpert + pid_m).to(tl.int32)
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs)       # [M]
    else:
        e = tl.load(BlockExpert + pid_m)
        pair = tl.load(Pairs + rows)                                        # [M]
    ok = pair < num_pairs
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                             # [N]
    kk = tl.arange(0, BLOCK_K)
    k_end = tl.where(e < num_experts, K, 0)
    w = W + tl.minimum(e, num_experts - 1).to(tl.int64) * stride_we
    return rows, pair, ok, n, kk, k_end, w


@triton.jit(**per_batch(ints=("num_pairs",)))
def _moe_up_kernel(X, W13, Inter, Pairs, BlockExpert, num_pairs, top_k, num_experts,
                   stride_xt, stride_we, stride_wn, stride_wk, stride_it,
                   K: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIR_BLOCKS: tl.constexpr):
    """Inter[rows, n] = silu(x @ w13[e, n].T) * (x @ w13[e, I + n].T) for one expert block."""
    rows, pair, ok, n, kk, k_end, w = _expert_block(Pairs, BlockExpert, W13, num_pairs,
                                                    num_experts, stride_we, I, K, BLOCK_M,
                                                    BLOCK_N, BLOCK_K, PAIR_BLOCKS)
    tok = (pair // top_k).to(tl.int64)
    a_ptr = X + tok[:, None] * stride_xt + kk[None, :]                       # [M, K]
    g_ptr = w + n[None, :] * stride_wn + kk[:, None] * stride_wk            # [K, N]
    u_ptr = g_ptr + I * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        kmask = (k0 + kk) < K
        a = tl.load(a_ptr, mask=ok[:, None] & kmask[None, :], other=0.0)
        bmask = kmask[:, None] & (n[None, :] < I)
        acc_g = tl.dot(a, tl.load(g_ptr, mask=bmask, other=0.0), acc_g)
        acc_u = tl.dot(a, tl.load(u_ptr, mask=bmask, other=0.0), acc_u)
        a_ptr += BLOCK_K
        g_ptr += BLOCK_K * stride_wk
        u_ptr += BLOCK_K * stride_wk
    y = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(Inter + rows[:, None].to(tl.int64) * stride_it + n[None, :],
             y.to(Inter.dtype.element_ty), mask=ok[:, None] & (n[None, :] < I))


@triton.jit(**per_batch(ints=("num_pairs",)))
def _moe_down_kernel(Inter, W2, Weights, Out, Pairs, BlockExpert, num_pairs, num_experts,
                     stride_it, stride_we, stride_wn, stride_wk, stride_ot,
                     K: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIR_BLOCKS: tl.constexpr):
    """Out[pair, n] = weight[pair] * (inter[rows] @ w2[e, n].T) for one expert block."""
    rows, pair, ok, n, kk, k_end, w = _expert_block(Pairs, BlockExpert, W2, num_pairs,
                                                    num_experts, stride_we, H, K, BLOCK_M,
                                                    BLOCK_N, BLOCK_K, PAIR_BLOCKS)
    a_ptr = Inter + rows[:, None].to(tl.int64) * stride_it + kk[None, :]    # [M, K]
    b_ptr = w + n[None, :] * stride_wn + kk[:, None] * stride_wk            # [K, N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        kmask = (k0 + kk) < K
        a = tl.load(a_ptr, mask=ok[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr, mask=kmask[:, None] & (n[None, :] < H), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K * stride_wk
    wt = tl.load(Weights + pair, mask=ok, other=0.0).to(tl.float32)          # [M]
    tl.store(Out + pair[:, None].to(tl.int64) * stride_ot + n[None, :],
             (acc * wt[:, None]).to(Out.dtype.element_ty), mask=ok[:, None] & (n[None, :] < H))


@dataclass(frozen=True)
class MoeTiles:
    """Launch shape of both grouped GEMMs: block_m (pair) rows x block_n output columns per
    program, block_k deep steps."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def moe_tiles(pairs_per_expert: float) -> MoeTiles:
    """The default tiles by (token, expert) pairs per expert: small row blocks when experts
    get few rows (decode), big ones for prefill; the best of `python -m scripts.kernel_bench
    tune moe` (docs/KERNELS.md). Tiny in the interpreter."""
    if interpreting():
        return MoeTiles(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
    if pairs_per_expert <= 16:
        return MoeTiles(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    if pairs_per_expert <= 48:
        return MoeTiles(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=4)
    return MoeTiles(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


@triton.jit
def _sum_topk_kernel(Pairs, Out, stride_p, stride_o, TOP_K: tl.constexpr, H: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """Out[t, cols] = sum over j < TOP_K of Pairs[t * TOP_K + j, cols], in fp32, rounded once."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                  # [BLOCK_H]
    ok = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(Pairs + (t * TOP_K + j) * stride_p + h, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + t * stride_o + h, acc.to(Out.dtype.element_ty), mask=ok)


SUM_BLOCK_H = 1024


def sum_topk(out_pairs: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """out_pairs [T*k, H] -> [T, H]: one launch (torch's sum in fp32 + cast back took two)."""
    h = out_pairs.shape[1]
    out = torch.empty(t, h, dtype=out_pairs.dtype, device=out_pairs.device)
    block_h = 16 if interpreting() else SUM_BLOCK_H
    _sum_topk_kernel[(t, triton.cdiv(h, block_h))](
        out_pairs, out, out_pairs.stride(0), out.stride(0), TOP_K=k, H=h, BLOCK_H=block_h,
        num_warps=4)
    return out


@register("fused_moe", backend="triton", priority=PRIORITY, supports=on_cuda_half)
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, tiles: MoeTiles | None = None) -> torch.Tensor:
    """x: [T, H], w13: [E, 2I, H], w2: [E, H, I], weights/ids: [T, k] -> [T, H]. tiles: None
    for `moe_tiles`."""
    t, h = x.shape
    e, two_i, h2 = w13.shape
    inter = two_i // 2
    check(h2 == h and w2.shape == (e, h, inter), "fused_moe: weight shapes disagree with x")
    check(x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1,
          "fused_moe: x and weights must be contiguous in their last dim")
    k = ids.shape[1]
    n = t * k
    if n == 0:
        return torch.zeros_like(x)
    tiles = moe_tiles(n / e) if tiles is None else tiles
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    pair_blocks = n <= PAIR_BLOCKS_MAX
    if pair_blocks:   # batch-1 decode: no alignment launches; the kernels read the ids
        block_expert = ids.reshape(-1)
        pairs, nb = block_expert, n
    else:
        pairs, block_expert, nb = align_by_expert(ids, e, bm)
    inter_buf = torch.empty(nb * bm, inter, dtype=x.dtype, device=x.device)   # [NB*M, I]
    launch = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                  PAIR_BLOCKS=pair_blocks)
    _moe_up_kernel[(nb * triton.cdiv(inter, bn),)](
        x, w13, inter_buf, pairs, block_expert, n, k, e, x.stride(0), w13.stride(0),
        w13.stride(1), w13.stride(2), inter_buf.stride(0), K=h, I=inter, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, **launch)
    # weighted expert outputs in x's dtype (HF rounds each expert's output to it too; an fp32
    # buffer would double this write + read)
    out_pairs = torch.empty(n, h, dtype=x.dtype, device=x.device)            # [T*k, H]
    wflat = weights.reshape(-1).float().contiguous()                          # [T*k]
    _moe_down_kernel[(nb * triton.cdiv(h, bn),)](
        inter_buf, w2, wflat, out_pairs, pairs, block_expert, n, e, inter_buf.stride(0),
        w2.stride(0), w2.stride(1), w2.stride(2), out_pairs.stride(0), K=inter, H=h,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **launch)
    return sum_topk(out_pairs, t, k)                                          # [T, H]
