"""`linear` of a few rows (2-64: a decode step of a few streams, a short verify or prefill
chunk): each program reads its [BLOCK_N, BLOCK_K] tiles of the weight once and multiplies them
with every row at once on the tensor cores (the rows padded to one 16-row tile, from 17 rows
one 64-row tile), so the weight streams from HBM once, as the one-row GEMV's does (gemv.py).

At these shapes a decode step only streams weights. cuBLAS picks split-K kernels for the narrow
ones and pays a reduce kernel after each (the 8B's batch-16 profile: 64 `splitKreduce` launches
a step), and cannot start under programmatic dependent launch. Here no K is split: there are
enough output tiles to fill the GPU, no reduce, no workspace, and the first weight tile is
asked into L2 before the PDL wait (pdl.py).

H100 (copy 3.03 TB/s), `scripts/gpu_few_rows_bench.py` (graph replays, weights read from HBM),
us a call at 4 / 16 rows, cuBLAS -> this kernel at the tiles `few_rows_config` now gives: the
8B's o 15.88 -> 13.31 / 16.26 -> 13.18, down 42.70 -> 41.08 / 43.68 -> 40.97, lm_head 362.9
-> 333.7 / 366.7 -> 339.1, qkv 19.85 -> 18.90 / 20.01 -> 19.20, gate_up 77.99 -> 77.72 / 79.04
-> 78.92 (cuBLAS is already at copy speed there). Through the daemon (the same card, 8B, 128 in
/ 256 out, two rounds each, with the first rule's tiles: 32x256 for qkv, 64x256 for gate_up and
the head): 4 streams 654.0 / 652.7 -> 673.2 / 669.7 tok/s, 16 streams 2,446 / 2,381 -> 2,510 /
2,529.

17-64 rows (the same card and script, `--rows 24 32 48 64`): a step's linear layers 1.023-1.042x
of cuBLAS's, the qkv weight tied (so it stays on cuBLAS); the daemon's 32 streams 4,422 / 4,293
-> 4,532 / 4,561 tok/s, 48 streams 6,197 / 6,176 -> 6,398 / 6,437. At 128-256 rows cuBLAS was
faster at every tile swept (docs/KERNELS.md).

DeepSeek-V2-Lite's smaller weights (576-3,072 outputs of 2,048-2,816 inputs; `--shapes`, the
same card): cuBLAS reaches 14-60% of copy on them. At 4 / 16 rows NARROW's tiles took q
6.87 -> 6.31 / 7.24 -> 6.26 us (32x256; TALL's was slower than cuBLAS), kv_a 5.65 -> 4.12,
o 6.12 -> 5.10, the shared experts' down 8.92 -> 6.46; at 64 rows MEDIUM_NARROW q 7.41 ->
6.72 and MEDIUM_SMALL kv_a 5.75 -> 4.87, o 6.31 -> 5.37, down 7.52 -> 6.77. A step's dense
linears (26 layers): 978 -> 806 us at 4 rows, 967 -> 878 at 64 (best tiles swept). Through
the daemon (DeepSeek-V2-Lite, 128 in / 256 out, cuBLAS -> these tiles for the small weights,
two rounds, one box), decode TPS a stream: 4 streams 158.3 / 158.4 -> 161.1 / 161.3, 16
streams 91.3 / 92.2 -> 94.0 / 93.4, 32 streams 75.8 / 76.0 -> 76.6 / 76.4.

A SwiGLU MLP's gate|up (`linear_silu_and_mul`) pairs gate and up rows in each output tile
and applies the SiLU in the epilogue, as the one-row GEMV does (SILU_MUL): one launch a layer
and no [rows, 2I] intermediate, bit-equal to this kernel then silu_and_mul. H100 (`scripts/
gpu_few_rows_bench.py --silu`, the 8B's gate_up, graph replays), us a layer at 2 / 8 / 16 /
32 / 64 rows, cuBLAS + silu_and_mul, this kernel + silu_and_mul -> one launch: 78.9, 78.3 ->
77.5; 80.7, 79.6 -> 78.0; 85.2, 80.3 -> 78.8; 83.1, 81.7 -> 80.2; 85.9, 84.0 -> 81.2 (1-3%
of the layer; not yet timed through the daemon).

TOKENSPEED_FEW_ROWS=0 leaves these rows to cuBLAS (a benchmark's A/B switch).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton.common import per_batch
from kernels.triton.elementwise import swiglu
from kernels.triton.pdl import pdl_begin, pdl_launch, prefetch_l2

ENV = "TOKENSPEED_FEW_ROWS"
BLOCK_M = 16      # one MMA tile of rows: 2-16 rows
MEDIUM_BLOCK_M = 64
MAX_ROWS = MEDIUM_BLOCK_M


@dataclass(frozen=True)
class FewRowsConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    block_m: int = BLOCK_M   # rows a program; more rows than this take several row tiles


# the best of gpu_few_rows_bench.py's 24 tiles per shape (H100, 4 and 16 rows, module doc)
NARROW = FewRowsConfig(block_n=32, block_k=256, num_warps=4, num_stages=4)   # o, down, small
TALL = FewRowsConfig(block_n=16, block_k=512, num_warps=4, num_stages=3)     # qkv
WIDE = FewRowsConfig(block_n=128, block_k=256, num_warps=4, num_stages=3)    # gate_up, head
# 17-64 rows, one 64-row tile (gpu_few_rows_bench.py --rows 24 32 48 64, H100): o and down
# 1.02-1.08x of cuBLAS, gate_up 1.01-1.02x, the head 1.06-1.07x; qkv ties, so stays on cuBLAS
MEDIUM_NARROW = FewRowsConfig(block_n=32, block_k=256, num_warps=4, num_stages=4,
                              block_m=MEDIUM_BLOCK_M)                          # o, down
MEDIUM_WIDE = FewRowsConfig(block_n=128, block_k=128, num_warps=4, num_stages=4,
                            block_m=MEDIUM_BLOCK_M)                            # gate_up, head
# 17-64 rows of a weight of at most SMALL_N outputs (DeepSeek-V2-Lite's kv_a, o and shared
# experts' down: 1.11-1.18x of cuBLAS at 64 rows, where MEDIUM_NARROW ties)
MEDIUM_SMALL = FewRowsConfig(block_n=16, block_k=256, num_warps=4, num_stages=4,
                             block_m=MEDIUM_BLOCK_M)
WIDE_N = 8192
SMALL_N = 2048
MIN_N = 512    # the fewest output rows timed (DeepSeek-V2-Lite's kv_a: 576); fewer stay on cuBLAS
BIG_N = 4096   # from here a weight is the 8B's kind: qkv-shaped ones (N > K) take TALL / cuBLAS


def few_rows_config(n: int, k: int, rows: int = BLOCK_M) -> FewRowsConfig | None:
    """The tiles of `rows` rows times an [N, K] weight, None where cuBLAS is as fast. Narrow
    weights take tiles of 16-32 outputs, so that the output tiles still fill the GPU without
    splitting K; from 17 rows one 64-row tile holds them all (at 128 rows and more cuBLAS was
    faster at every tile: the weight is no longer all a step reads)."""
    if rows <= BLOCK_M:
        if n > WIDE_N:
            return WIDE
        return TALL if n > k and n >= BIG_N else NARROW
    if n > WIDE_N:
        return MEDIUM_WIDE
    if n <= SMALL_N:
        return MEDIUM_SMALL
    return None if n > k and n >= BIG_N else MEDIUM_NARROW


@triton.jit(**per_batch(ints=("M",)))   # the row count: one compiled variant a row tile
def _few_rows_kernel(X, W, B, Out, M, N, K, stride_x, stride_w, stride_o,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, STREAM_W: tl.constexpr,
                     SILU_MUL: tl.constexpr, PDL: tl.constexpr):
    """Out[m, n] = X[m] . W[n] (+ B[n]) for the BLOCK_M rows m and BLOCK_N outputs n of a
    program. The row tiles of one output tile are neighbouring programs, so that the later ones
    read its weight from L2; with one row tile (STREAM_W) the weight streams past L2. Rows past
    N read row 0 (nothing is stored for them): the weight loads need no mask. SILU_MUL: W is N
    gate rows then N up rows, a program's outputs BLOCK_N / 2 (gate j, up j) pairs side by
    side, and Out[m, j] = silu(gate) * up its epilogue (gemv.py's SILU_MUL, as the plain
    kernel then silu_and_mul would round them)."""
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    r = tl.arange(0, BLOCK_N)
    if SILU_MUL:
        j = (pid // m_tiles) * (BLOCK_N // 2) + r // 2                 # [BN] output column
        n = j + (r % 2) * N                                            # gate row j, up row N + j
        n_ok = j < N
    else:
        n = (pid // m_tiles) * BLOCK_N + r                             # [BN]
        n_ok = n < N
    m = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)               # [BM]
    m_ok = m < M
    k = tl.arange(0, BLOCK_K)                                           # [BK]
    w_rows = W + tl.where(n_ok, n, 0).to(tl.int64)[:, None] * stride_w  # [BN, 1]
    x_rows = X + m.to(tl.int64)[:, None] * stride_x                     # [BM, 1]
    if PDL:
        # weights are never written while serving: the first tile's lines stream into L2
        # while the kernel that writes X ends (pdl.py)
        lines = tl.arange(0, (BLOCK_K + 63) // 64) * 64                # a line per 64 elements
        prefetch_l2(w_rows + tl.where(lines < K, lines, 0)[None, :])
    pdl_begin(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        if EVEN_K:
            x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
            if STREAM_W:
                w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")
            else:
                w = tl.load(w_rows + kk[None, :])
        else:
            k_ok = kk < K
            x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if STREAM_W:
                w = tl.load(w_rows + kk[None, :], mask=k_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            else:
                w = tl.load(w_rows + kk[None, :], mask=k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)  # [BM, BN]
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:
        gate, up = tl.split(tl.reshape(acc.to(Out.dtype.element_ty).to(tl.float32),
                                       [BLOCK_M, BLOCK_N // 2, 2]))   # [BM, BN/2] each
        j = (pid // m_tiles) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(Out + m[:, None] * stride_o + j[None, :],
                 swiglu(gate, up).to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & (j < N)[None, :])
    else:
        tl.store(Out + m[:, None] * stride_o + n[None, :], acc.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    config: FewRowsConfig | None = None, silu_mul: bool = False
                    ) -> torch.Tensor:
    """x: [M, K] (rows contiguous), weight: [N, K] (rows contiguous), bias: [N] -> [M, N];
    `config` (default: `few_rows_config`'s) may take more rows than one tile holds.
    silu_mul: weight is gate rows then up rows (N even) -> silu(gate) * up [M, N / 2], in the
    same launch."""
    rows, k = x.shape
    n = weight.shape[0]
    config = config or few_rows_config(n, k, rows)
    if rows < 1 or config is None or x.stride(1) != 1 or weight.stride(1) != 1 \
            or weight.shape[1] != k or (silu_mul and n % 2):
        raise ValueError(f"few_rows_linear: expected row-contiguous x [M, {weight.shape[1]}] "
                         f"of a shape with tiles (few_rows_config), got x {tuple(x.shape)} "
                         f"strides {x.stride()} for a weight {tuple(weight.shape)}"
                         f"{' (silu_mul: gate and up rows of equal count)' if silu_mul else ''}")
    width = n // 2 if silu_mul else n
    out = torch.empty((rows, width), device=x.device, dtype=x.dtype)
    m_tiles = triton.cdiv(rows, config.block_m)
    _few_rows_kernel[(triton.cdiv(n, config.block_n) * m_tiles,)](
        x, weight, bias if bias is not None else out, out, rows, width, k, x.stride(0),
        weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        STREAM_W=m_tiles == 1, SILU_MUL=silu_mul,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(x.device))
    return out


def few_rows_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """2-64 rows with contiguous elements, a row-contiguous 16-bit weight of their dtype with
    at least MIN_N rows and tiles for that shape, and not turned off (TOKENSPEED_FEW_ROWS=0)."""
    return (x.dim() == 2 and 2 <= x.shape[0] <= MAX_ROWS and x.stride(1) == 1
            and x.dtype in (torch.float16, torch.bfloat16) and weight.dim() == 2
            and weight.shape[0] >= MIN_N
            and weight.dtype == x.dtype and weight.stride(1) == 1
            and x.shape[1] == weight.shape[1]
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
            and few_rows_config(weight.shape[0], x.shape[1], x.shape[0]) is not None
            and few_rows_enabled())


@functools.lru_cache(maxsize=None)
def few_rows_enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"
