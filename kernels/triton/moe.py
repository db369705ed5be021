"""Fused MoE in Triton: align (token, expert) pairs by expert, a grouped GEMM with SiLU-and-mul
fused (x @ w13[e].T -> silu(gate) * up), then the grouped down projection scaled by each pair's
routing weight, summed over the top-k (a third, small kernel).

Alignment happens on the device with torch ops and no host sync: pairs are sorted by expert and
each expert's segment is padded to a multiple of BLOCK_M, so every M-block of the sorted order
belongs to one expert. The grid is sized by the worst case (T*k + E*(BLOCK_M-1) rows); blocks
past the last expert do no work. With at most PAIR_BLOCKS_MAX pairs (batch-1 decode) there is
no alignment: block p serves pair p alone, its expert read from the routing ids.

GPT-OSS options (constexpr-gated: the default variant compiles as before): expert biases
(b13 added before the activation, b2 before the routing weight), the clamped SwiGLU
(kernels/moe_activation.py) and gate/up rows interleaved in w13 (then one [K, 2 BLOCK_N] tile
of pairs is loaded and its product split into gate and up). `fused_moe_mxfp4` runs the same
kernels on MXFP4 weights (kernels/mxfp4.py; GPT-OSS's released format): each weight tile is
read packed (half a byte a weight + a byte per 32) and decoded in registers before its dot."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.moe_activation import ClampedSwiGLU
from kernels.registry import register
from kernels.triton.common import PRIORITY, check, interpreting, on_cuda_half, per_batch
from kernels.triton.elementwise import swiglu
from kernels.triton.gemv import linear, linear_silu_and_mul
from kernels.triton.moe_gemv import moe_gemv, moe_gemv_applies, shared_slices
from kernels.triton.pdl import pdl_begin, pdl_launch

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
    idle block), its expert's weights W[e], e (clamped to a real expert: bias offsets)).

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
    ec = tl.minimum(e, num_experts - 1).to(tl.int64)
    return rows, pair, ok, n, kk, k_end, W + ec * stride_we, ec


@triton.jit
def _fp4_values(codes):
    """FP4 E2M1 codes (int32, 0..15) -> float32: sign bit 3, exponent bits 2-1, mantissa bit
    0; exponent 0 is subnormal (0 or 0.5)."""
    e = (codes >> 1) & 3
    m = (codes & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where(codes >= 8, -mag, mag)


@triton.jit
def _mxfp4_tile(Blocks, Scales, rows, row_ok, k0, stride_bn, stride_sn, K: tl.constexpr,
                BLOCK_K: tl.constexpr, R: tl.constexpr, dtype: tl.constexpr):
    """W[rows, k0 : k0 + BLOCK_K]^T as a [BLOCK_K, R] tile in `dtype`, decoded from MXFP4 rows:
    Blocks[row] holds K / 2 bytes (element 2j in byte j's low nibble, 2j + 1 in its high one),
    Scales[row] K / 32 exponents (2^(s - 127)). BLOCK_K is a multiple of 32."""
    r = rows[:, None].to(tl.int64)
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)                                 # [K/2] bytes
    raw = tl.load(Blocks + r * stride_bn + kb[None, :],
                  mask=row_ok[:, None] & (kb < K // 2)[None, :], other=0).to(tl.int32)
    vals = tl.reshape(tl.join(_fp4_values(raw & 15), _fp4_values(raw >> 4)), [R, BLOCK_K])
    ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)                               # [K/32]
    sc = tl.load(Scales + r * stride_sn + ks[None, :],
                 mask=row_ok[:, None] & (ks < K // 32)[None, :], other=127).to(tl.float32)
    vals = tl.reshape(vals, [R, BLOCK_K // 32, 32]) * tl.exp2(sc - 127.0)[:, :, None]
    return tl.trans(tl.reshape(vals, [R, BLOCK_K]).to(dtype))                 # [K, R]


@triton.jit
def _gate_up_interleaved(a_ptr, ok, w, ws, pid_n, kk, k_end, B13, stride_be, ec, stride_wn,
                         stride_wk, stride_sn, K: tl.constexpr, I: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         HAS_BIAS: tl.constexpr, MXFP4: tl.constexpr):
    """(gate, up) [M, N] when w13's rows alternate gate / up: rows 2n, 2n + 1 of the block's
    BLOCK_N pairs are one contiguous [K, 2N] tile (MXFP4: decoded from w's codes and ws's
    scales); the product is split by column parity."""
    n2 = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)                   # [2N] w13 rows
    b_ptr = w + n2[None, :] * stride_wn + kk[:, None] * stride_wk           # [K, 2N]
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        kmask = (k0 + kk) < K
        a = tl.load(a_ptr, mask=ok[:, None] & kmask[None, :], other=0.0)
        if MXFP4:
            b = _mxfp4_tile(w, ws, n2, n2 < 2 * I, k0, stride_wn, stride_sn, K, BLOCK_K,
                            2 * BLOCK_N, a.dtype)
        else:
            b = tl.load(b_ptr, mask=kmask[:, None] & (n2[None, :] < 2 * I), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(B13 + ec * stride_be + n2, mask=n2 < 2 * I, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))


@triton.jit(**per_batch(ints=("num_pairs",)))
def _moe_up_kernel(X, W13, Inter, Pairs, BlockExpert, B13, W13S, num_pairs, top_k,
                   num_experts, stride_xt, stride_we, stride_wn, stride_wk, stride_it,
                   stride_be, stride_se, stride_sn, alpha, limit, K: tl.constexpr,
                   I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PAIR_BLOCKS: tl.constexpr, HAS_BIAS: tl.constexpr,
                   CLAMPED: tl.constexpr, INTERLEAVED: tl.constexpr, MXFP4: tl.constexpr,
                   PDL: tl.constexpr):
    """Inter[rows, n] = silu(x @ w13[e, n].T) * (x @ w13[e, I + n].T) for one expert block;
    or, as the constexprs say, + b13[e], gate/up rows 2n / 2n + 1, the clamped SwiGLU, and
    (with INTERLEAVED) w13 as MXFP4 codes (W13) + scales (W13S)."""
    pdl_begin(PDL)
    rows, pair, ok, n, kk, k_end, w, ec = _expert_block(Pairs, BlockExpert, W13, num_pairs,
                                                        num_experts, stride_we, I, K, BLOCK_M,
                                                        BLOCK_N, BLOCK_K, PAIR_BLOCKS)
    tok = (pair // top_k).to(tl.int64)
    a_ptr = X + tok[:, None] * stride_xt + kk[None, :]                       # [M, K]
    if INTERLEAVED:
        acc_g, acc_u = _gate_up_interleaved(a_ptr, ok, w, W13S + ec * stride_se,
                                            tl.program_id(0) % tl.cdiv(I, BLOCK_N), kk, k_end,
                                            B13, stride_be, ec, stride_wn, stride_wk,
                                            stride_sn, K, I, BLOCK_M, BLOCK_N, BLOCK_K,
                                            HAS_BIAS, MXFP4)
    else:
        g_ptr = w + n[None, :] * stride_wn + kk[:, None] * stride_wk        # [K, N]
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
        if HAS_BIAS:
            bias = B13 + ec * stride_be + n
            acc_g += tl.load(bias, mask=n < I, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(bias + I, mask=n < I, other=0.0).to(tl.float32)[None, :]
    if CLAMPED:
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        y = (u + 1.0) * g * tl.sigmoid(g * alpha)
    else:
        y = swiglu(acc_g, acc_u)
    tl.store(Inter + rows[:, None].to(tl.int64) * stride_it + n[None, :],
             y.to(Inter.dtype.element_ty), mask=ok[:, None] & (n[None, :] < I))


@triton.jit(**per_batch(ints=("num_pairs",)))
def _moe_down_kernel(Inter, W2, Weights, Out, Pairs, BlockExpert, B2, W2S, num_pairs,
                     num_experts, stride_it, stride_we, stride_wn, stride_wk, stride_ot,
                     stride_be, stride_se, stride_sn, K: tl.constexpr, H: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PAIR_BLOCKS: tl.constexpr, HAS_BIAS: tl.constexpr, MXFP4: tl.constexpr,
                     PDL: tl.constexpr):
    """Out[pair, n] = weight[pair] * (inter[rows] @ w2[e, n].T (+ b2[e, n])) for one expert
    block; MXFP4: w2 as codes (W2) + scales (W2S)."""
    pdl_begin(PDL)
    rows, pair, ok, n, kk, k_end, w, ec = _expert_block(Pairs, BlockExpert, W2, num_pairs,
                                                        num_experts, stride_we, H, K, BLOCK_M,
                                                        BLOCK_N, BLOCK_K, PAIR_BLOCKS)
    a_ptr = Inter + rows[:, None].to(tl.int64) * stride_it + kk[None, :]    # [M, K]
    b_ptr = w + n[None, :] * stride_wn + kk[:, None] * stride_wk            # [K, N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        kmask = (k0 + kk) < K
        a = tl.load(a_ptr, mask=ok[:, None] & kmask[None, :], other=0.0)
        if MXFP4:
            b = _mxfp4_tile(w, W2S + ec * stride_se, n, n < H, k0, stride_wn, stride_sn, K,
                            BLOCK_K, BLOCK_N, a.dtype)
        else:
            b = tl.load(b_ptr, mask=kmask[:, None] & (n[None, :] < H), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K * stride_wk
    if HAS_BIAS:  # not in idle blocks (k_end 0): another rank's experts contribute nothing
        bias = tl.load(B2 + ec * stride_be + n, mask=n < H, other=0.0).to(tl.float32)
        acc += tl.where(k_end > 0, bias, 0.0)[None, :]
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
def _sum_topk_kernel(Pairs, Shared, Out, stride_p, stride_s, stride_o, TOP_K: tl.constexpr,
                     H: tl.constexpr, BLOCK_H: tl.constexpr, HAS_SHARED: tl.constexpr,
                     PDL: tl.constexpr):
    """Out[t, cols] = sum over j < TOP_K of Pairs[t * TOP_K + j, cols] (+ Shared[t, cols]), in
    fp32, rounded once."""
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                  # [BLOCK_H]
    ok = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(Pairs + (t * TOP_K + j) * stride_p + h, mask=ok, other=0.0).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(Shared + t * stride_s + h, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + t * stride_o + h, acc.to(Out.dtype.element_ty), mask=ok)


SUM_BLOCK_H = 1024


def sum_topk(out_pairs: torch.Tensor, t: int, k: int, shared: torch.Tensor | None = None
             ) -> torch.Tensor:
    """out_pairs [T*k, H] (+ shared [T, H]) -> [T, H]: one launch (torch's sum in fp32 + cast
    back took two; the shared experts' add one more)."""
    h = out_pairs.shape[1]
    out = torch.empty(t, h, dtype=out_pairs.dtype, device=out_pairs.device)
    block_h = 16 if interpreting() else SUM_BLOCK_H
    _sum_topk_kernel[(t, triton.cdiv(h, block_h))](
        out_pairs, out if shared is None else shared, out, out_pairs.stride(0),
        0 if shared is None else shared.stride(0), out.stride(0), TOP_K=k, H=h,
        BLOCK_H=block_h, HAS_SHARED=shared is not None, num_warps=4, **pdl_launch(out.device))
    return out


@register("fused_moe", backend="triton", priority=PRIORITY, supports=on_cuda_half)
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
              activation: ClampedSwiGLU | None = None, interleaved: bool = False,
              shared: torch.Tensor | None = None, tiles: MoeTiles | None = None,
              shared_mlp: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x: [T, H], w13: [E, 2I, H], w2: [E, H, I] (any strides), weights/ids: [T, k] -> [T, H].
    b13 [E, 2I] / b2 [E, H] / activation / interleaved: GPT-OSS (the reference's doc).
    shared [T, H]: added in the top-k sum's launch; shared_mlp: the shared experts' weights
    (the reference's doc). tiles: None for `moe_tiles`. One token without GPT-OSS's options
    (batch-1 decode) takes moe_gemv.py's two GEMVs, the shared experts' slices among their
    pairs; elsewhere the shared experts run as SwiGLUMLP would (gemv.py's ops)."""
    e, two_i, h = w13.shape
    check(h == x.shape[1] and w2.shape == (e, h, two_i // 2),
          "fused_moe: weight shapes disagree with x")
    check(shared is None or shared_mlp is None, "fused_moe: shared or shared_mlp, not both")
    gemv_path = (tiles is None and b13 is None and b2 is None and activation is None
                 and not interleaved and moe_gemv_applies(x, w13, w2))
    if shared_mlp is not None and not (gemv_path and shared_slices(shared_mlp, two_i // 2)):
        sw13, sw2 = shared_mlp
        shared, shared_mlp = linear(linear_silu_and_mul(x, sw13), sw2), None
    if gemv_path:
        return moe_gemv(x, w13, w2, weights, ids, shared, shared_mlp)
    return _fused_moe(x, (w13, None), (w2, None), (e, two_i // 2, h), weights, ids, b13, b2,
                      activation, interleaved, tiles, shared)


@register("fused_moe_mxfp4", backend="triton", priority=PRIORITY, supports=on_cuda_half)
def fused_moe_mxfp4(x: torch.Tensor, w13_blocks: torch.Tensor, w13_scales: torch.Tensor,
                    w2_blocks: torch.Tensor, w2_scales: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor, b13: torch.Tensor | None = None,
                    b2: torch.Tensor | None = None, activation: ClampedSwiGLU | None = None,
                    interleaved: bool = True, tiles: MoeTiles | None = None) -> torch.Tensor:
    """fused_moe on MXFP4 weights read packed: w13 as blocks [E, 2I, H/32, 16] + scales
    [E, 2I, H/32] (gate/up rows interleaved: required), w2 as [E, H, I/32, 16] + [E, H, I/32]
    (uint8, rows of codes contiguous). tiles: None for `moe_tiles` (block_k at least 32)."""
    e, two_i, groups, nbytes = w13_blocks.shape
    h, inter = groups * 32, two_i // 2
    check(interleaved, "fused_moe_mxfp4: gate/up rows must be interleaved (GPT-OSS's layout)")
    check(nbytes == 16 and h == x.shape[1] and w13_scales.shape == (e, two_i, groups)
          and w2_blocks.shape == (e, h, inter // 32, 16)
          and w2_scales.shape == (e, h, inter // 32) and inter % 32 == 0,
          "fused_moe_mxfp4: blocks / scales shapes disagree with x")
    check(all(t.dtype == torch.uint8 and t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]
              for t in (w13_blocks, w2_blocks)) and w13_scales.stride(-1) == 1
          and w2_scales.stride(-1) == 1, "fused_moe_mxfp4: uint8 rows of codes, contiguous")
    tiles = tiles or moe_tiles(ids.numel() / e)
    tiles = dataclasses.replace(tiles, block_k=max(32, tiles.block_k))
    return _fused_moe(x, (w13_blocks, w13_scales), (w2_blocks, w2_scales), (e, inter, h),
                      weights, ids, b13, b2, activation, interleaved, tiles)


def _fused_moe(x: torch.Tensor, w13: tuple, w2: tuple, dims: tuple[int, int, int],
               weights: torch.Tensor, ids: torch.Tensor, b13: torch.Tensor | None,
               b2: torch.Tensor | None, activation: ClampedSwiGLU | None, interleaved: bool,
               tiles: MoeTiles | None, shared: torch.Tensor | None = None) -> torch.Tensor:
    """Both launches + the top-k sum (+ shared). w13 / w2: (weights, None), or MXFP4 (codes,
    scales)."""
    (w13, s13), (w2, s2) = w13, w2
    e, inter, h = dims
    t = x.shape[0]
    check(x.stride(1) == 1, "fused_moe: x must be contiguous in its last dim")
    check(b13 is None or (b13.shape == (e, 2 * inter) and b13.stride(1) == 1),
          "fused_moe: b13 must be [E, 2I], contiguous rows")
    check(b2 is None or (b2.shape == (e, h) and b2.stride(1) == 1),
          "fused_moe: b2 must be [E, H], contiguous rows")
    check(shared is None or (shared.shape == x.shape and shared.stride(1) == 1),
          "fused_moe: shared must be [T, H] like x, contiguous rows")
    k = ids.shape[1]
    n = t * k
    if n == 0:
        return torch.zeros_like(x) if shared is None else shared.clone()
    tiles = moe_tiles(n / e) if tiles is None else tiles
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    pair_blocks = n <= PAIR_BLOCKS_MAX
    if pair_blocks:   # batch-1 decode: no alignment launches; the kernels read the ids
        block_expert = ids.reshape(-1)
        pairs, nb = block_expert, n
    else:
        pairs, block_expert, nb = align_by_expert(ids, e, bm)
    inter_buf = torch.empty(nb * bm, inter, dtype=x.dtype, device=x.device)   # [NB*M, I]
    mxfp4 = s13 is not None
    launch = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                  PAIR_BLOCKS=pair_blocks, MXFP4=mxfp4, **pdl_launch(x.device))
    act = activation or ClampedSwiGLU()      # alpha / limit are read only when clamped
    _moe_up_kernel[(nb * triton.cdiv(inter, bn),)](
        x, w13, inter_buf, pairs, block_expert, x if b13 is None else b13,
        x if s13 is None else s13, n, k, e, x.stride(0), w13.stride(0), w13.stride(1),
        w13.stride(2), inter_buf.stride(0), 0 if b13 is None else b13.stride(0),
        *_scale_strides(s13), act.alpha, act.limit, K=h, I=inter, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, HAS_BIAS=b13 is not None, CLAMPED=activation is not None,
        INTERLEAVED=interleaved, **launch)
    # weighted expert outputs in x's dtype (HF rounds each expert's output to it too; an fp32
    # buffer would double this write + read)
    out_pairs = torch.empty(n, h, dtype=x.dtype, device=x.device)            # [T*k, H]
    wflat = weights.reshape(-1).float().contiguous()                          # [T*k]
    _moe_down_kernel[(nb * triton.cdiv(h, bn),)](
        inter_buf, w2, wflat, out_pairs, pairs, block_expert, x if b2 is None else b2,
        x if s2 is None else s2, n, e, inter_buf.stride(0), w2.stride(0), w2.stride(1),
        w2.stride(2), out_pairs.stride(0), 0 if b2 is None else b2.stride(0),
        *_scale_strides(s2), K=inter, H=h, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        HAS_BIAS=b2 is not None, **launch)
    return sum_topk(out_pairs, t, k, shared)                                  # [T, H]


def _scale_strides(scales: torch.Tensor | None) -> tuple[int, int]:
    """(expert, row) strides of MXFP4 scales; zeros without them."""
    return (0, 0) if scales is None else (scales.stride(0), scales.stride(1))
