"""Sampling in Triton without a host sync; the same function as kernels/reference/sample.py.

One program per row streams the vocabulary in BLOCK_V chunks. top-k: bisection over an
order-preserving integer key of the scaled logits finds the k-th largest value exactly (32
passes). top-p: bisection over the bits of positive floats finds the smallest e = exp(l - max)
whose strictly-larger mass is < top_p * Z (31 passes). Then Gumbel-max with counter-based noise.
Rows without top-k / top-p skip those passes."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference.sample import GOLDEN as _GOLDEN, MUL_A as _MUL_A, MUL_B as _MUL_B
from kernels.registry import register
from kernels.triton.common import interpreting, on_cuda

PRIORITY = 10
# the hash constants of the reference, as constexpr globals Triton may read
MUL_A = tl.constexpr(_MUL_A)
MUL_B = tl.constexpr(_MUL_B)
GOLDEN = tl.constexpr(_GOLDEN)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * MUL_A
    x = x ^ (x >> 15)
    x = x * MUL_B
    return x ^ (x >> 16)


@triton.jit
def _order_key(l):
    """float32 -> int64 key with the same order (for non-NaN values)."""
    b = l.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(b >= 0, b + 2147483648, 2147483647 - (b & 2147483647))


@triton.jit
def _sample_kernel(Logits, Temp, TopK, TopP, Seeds, Pos, Out, stride_l, V,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = Logits + row.to(tl.int64) * stride_l
    temp = tl.load(Temp + row).to(tl.float32)
    greedy = temp <= 0.0
    inv_t = tl.where(greedy, 1.0, temp)
    top_k = tl.load(TopK + row)
    top_p = tl.load(TopP + row).to(tl.float32)
    k_iters = tl.where((~greedy) & (top_k > 0) & (top_k < V), 32, 0)
    p_iters = tl.where((~greedy) & (top_p < 1.0), 31, 0)
    offs = tl.arange(0, BLOCK_V)
    # running max of the scaled logits
    m = tl.full((), float("-inf"), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        l = tl.load(base + v0 + offs, mask=v0 + offs < V, other=float("-inf")) / inv_t
        m = tl.maximum(m, tl.max(l, 0))
    # top-k: the largest key x with count(key >= x) >= k
    lo = tl.zeros((), dtype=tl.int64)
    hi = tl.full((), 4294967296, dtype=tl.int64)
    for _ in range(k_iters):
        mid = lo + (hi - lo) // 2
        cnt = tl.zeros((), dtype=tl.int32)
        for v0 in range(0, V, BLOCK_V):
            ok = v0 + offs < V
            l = tl.load(base + v0 + offs, mask=ok, other=float("-inf")) / inv_t
            cnt += tl.sum(((_order_key(l) >= mid) & ok).to(tl.int32), 0)
        big = cnt >= top_k
        lo = tl.where(big, mid, lo)
        hi = tl.where(big, hi, mid)
    kth_key = lo                                   # 0 when top-k is off: keeps everything
    # top-p: Z, then the smallest e with mass(e' > e) < top_p * Z
    z = tl.zeros((), dtype=tl.float32)
    if p_iters > 0:
        for v0 in range(0, V, BLOCK_V):
            ok = v0 + offs < V
            l = tl.load(base + v0 + offs, mask=ok, other=float("-inf")) / inv_t
            z += tl.sum(tl.where(ok & (_order_key(l) >= kth_key), tl.exp(l - m), 0.0), 0)
    plo = tl.zeros((), dtype=tl.int32)              # bits of 0.0: predicate false
    phi = tl.full((), 1065353216, dtype=tl.int32)   # bits of 1.0 (= max e): predicate true
    for _ in range(p_iters):
        mid = plo + (phi - plo) // 2
        x = mid.to(tl.float32, bitcast=True)
        s = tl.zeros((), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            ok = v0 + offs < V
            l = tl.load(base + v0 + offs, mask=ok, other=float("-inf")) / inv_t
            e = tl.where(ok & (_order_key(l) >= kth_key), tl.exp(l - m), 0.0)
            s += tl.sum(tl.where(e > x, e, 0.0), 0)
        pred = s < top_p * z
        phi = tl.where(pred, mid, phi)
        plo = tl.where(pred, plo, mid)
    e_min = tl.where(p_iters > 0, phi.to(tl.float32, bitcast=True), 0.0)
    # Gumbel-max over the kept tokens (plain argmax when greedy)
    seed = tl.load(Seeds + row)
    pos = tl.load(Pos + row)
    key = _mix32(seed.to(tl.uint32))
    key = _mix32(key ^ (seed >> 32).to(tl.uint32))
    key = _mix32(key ^ pos.to(tl.uint32))
    key = _mix32(key ^ (pos >> 32).to(tl.uint32))
    best = tl.full((), float("-inf"), dtype=tl.float32)
    best_i = tl.zeros((), dtype=tl.int32) + V
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        ok = idx < V
        l = tl.load(base + idx, mask=ok, other=float("-inf")) / inv_t
        keep = ok & (_order_key(l) >= kth_key) & (tl.exp(l - m) >= e_min)
        r = _mix32(key ^ (idx.to(tl.uint32) * GOLDEN))
        u = ((r >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        g = tl.where(greedy, 0.0, -tl.log(-tl.log(u)))
        score = tl.where(keep, l + g, float("-inf"))
        cmax = tl.max(score, 0)
        cidx = tl.min(tl.where(score == cmax, idx, V), 0)
        take = cmax > best
        best_i = tl.where(take, cidx, best_i)
        best = tl.where(take, cmax, best)
    tl.store(Out + row, best_i.to(tl.int32))


@register("sample", backend="triton", priority=PRIORITY, supports=on_cuda)
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] float32 -> tokens [B] int32."""
    b, v = logits.shape
    logits = logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(b, dtype=torch.int32, device=logits.device)
    if b == 0:
        return out
    block = 128 if interpreting() else 2048
    _sample_kernel[(b,)](logits, temperature.float(), top_k.int(), top_p.float(), seeds.long(),
                         positions.long(), out, logits.stride(0), v, BLOCK_V=block,
                         num_warps=8)
    return out
