"""Sampling in Triton without a host sync; the same function as kernels/reference/sample.py.

Two launches. Stage 1, one program per (row, vocab chunk): the chunk's best `l + gumbel`
(plain `l` when greedy; unused by filtered rows) and, when top-k is on with k <= KCAP or top-p
is on alone, the chunk's top-k candidates (k = KCAP for top-p alone; every element >= a floor
at or under the chunk's k-th largest: the global top-k is a subset of the union). The floor is
the k-th largest of the chunk's group maxima where k <= GROUPS and no more than KCAP elements
reach it, else the k-th largest itself, found by bisection over an order-preserving integer
key; for top-p alone also the chunk's mass sum(exp(l - chunk max)).
Stage 2, one program per row: rows with candidates finish on them (`_finish_candidates`: the
global top k and top-p's nucleus over e = exp(l - max), counted pairwise among the few
candidates at or above a floor; Gumbel-max). For top-p alone that is exact when
the global top KCAP hold at least top_p of the row's mass Z (summed from the chunk masses):
every token of the nucleus is then a candidate. Rows where they do not (a flat distribution),
rows with a chunk whose k-th value has more ties than its KCAP slots (e.g. masked logits), and
top-k > KCAP stream the whole row (bisection passes over the vocabulary); rows with neither
filter reduce the chunk bests.

The noise is the reference's exactly: float32 of a float64 -log(-log(u)). Computed for every
token it is 182 instructions a token on sm_90, 63 of them float64 (half rate), against 94
float32 / integer ones for a float32 estimate (scripts/sample_noise_sass.py); a plain
(temperature-only) launch of 256 rows took an H200 424 us against greedy's 92. So
`_noisy_argmax` estimates every score and computes exactly only the one that can win.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.reference.sample import GOLDEN as _GOLDEN
from kernels.reference.sample import MUL_A as _MUL_A
from kernels.reference.sample import MUL_B as _MUL_B
from kernels.registry import register
from kernels.triton.common import PRIORITY, interpreting, next_pow2, on_cuda, per_batch
from kernels.triton.pdl import pdl_begin, pdl_launch

ROW_PARAMS = ("Temp", "TopK", "TopP", "Seeds", "Pos")   # per-row views of one packed copy
# the hash constants of the reference, as constexpr globals Triton may read
MUL_A = tl.constexpr(_MUL_A)
MUL_B = tl.constexpr(_MUL_B)
GOLDEN = tl.constexpr(_GOLDEN)
# _noisy_argmax's margin around the estimated best: 500x the estimate's error, plus 8 float32
# ulps of the score for its additions' rounding
ESTIMATE_SLACK = tl.constexpr(1e-3)
ESTIMATE_SLACK_REL = tl.constexpr(2.0 ** -20)
MAX_CANDIDATE_GROUPS = 128
RANK_COLUMNS = 32    # _finish_ranked's pairwise counts: NTOP x 32 compared at a time


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * MUL_A
    x = x ^ (x >> 15)
    x = x * MUL_B
    return x ^ (x >> 16)


@triton.jit
def _row_key(Seeds, Pos, row):
    seed = tl.load(Seeds + row)
    pos = tl.load(Pos + row)
    key = _mix32(seed.to(tl.uint32))
    key = _mix32(key ^ (seed >> 32).to(tl.uint32))
    key = _mix32(key ^ pos.to(tl.uint32))
    return _mix32(key ^ (pos >> 32).to(tl.uint32))


@triton.jit
def _bits24(key, idx):
    """The 24 random bits of (row key, token id): u = (bits + 1/2) / 2^24."""
    return _mix32(key ^ (idx.to(tl.uint32) * GOLDEN)) >> 8


@triton.jit
def _gumbel(key, idx):
    """The reference's noise: float32 of -log(-log(u)) computed in float64."""
    return _gumbel_of_bits(_bits24(key, idx))


@triton.jit
def _gumbel_of_bits(r):
    u = (r.to(tl.float64) + 0.5) * (1.0 / 16777216.0)                  # exact in float64
    return (-tl.log(-tl.log(u))).to(tl.float32)


@triton.jit
def _gumbel_estimate(key, idx):
    """_gumbel in float32 (no float64 logs), within 1e-6 of it."""
    return _gumbel_estimate_of_bits(_bits24(key, idx))


@triton.jit
def _gumbel_estimate_of_bits(r):
    """Within 1e-6 of _gumbel_of_bits(r) for each of the 2^24 r (all checked: tests/kernels/
    test_gumbel_estimate.py). -log(u): for u <= 1/2 the float32 u is exact; above, w = 1 - u
    is, and -log(1 - w) = 2 atanh(w / (2 - w)), its series to z^17 (z <= 1/3: the next term
    is below float32's precision), not a log that would lose w in 1 - w."""
    rf = r.to(tl.float32)                                               # exact: < 2^24
    y_lo = -tl.log((rf + 0.5) * (1.0 / 16777216.0))
    w = ((16777216.0 - rf) - 0.5) * (1.0 / 16777216.0)
    z = w / (2.0 - w)
    z2 = z * z
    p = z2 * (1.0 / 17.0) + (1.0 / 15.0)
    p = p * z2 + (1.0 / 13.0)
    p = p * z2 + (1.0 / 11.0)
    p = p * z2 + (1.0 / 9.0)
    p = p * z2 + (1.0 / 7.0)
    p = p * z2 + (1.0 / 5.0)
    p = p * z2 + (1.0 / 3.0)
    p = p * z2 + 1.0
    y = tl.where(r >= 8388608, 2.0 * z * p, y_lo)
    return -tl.log(y)


@triton.jit
def _noisy_argmax(l, ids, valid, key, V):
    """(best, id): the largest l + _gumbel(key, id) over `valid` and its id (the smallest of
    ties; V for none), with _gumbel's float64 logs on one element, not all. A score estimated
    in float32 is off by under 2e-6 plus a float32 step of the score (the estimate's error, the
    rounding of g and of the addition), so every element within ESTIMATE_SLACK of the
    estimated best could be the exact best; when that is one element, it is, and only its
    score is computed exactly. Otherwise (near-ties, no finite best, NaN) every score is: the
    top two of n Gumbel draws are Exp(1) apart, so over flat logits about 1 chunk in 1,000."""
    est = tl.where(valid, l + _gumbel_estimate(key, ids), float("-inf"))
    top = tl.max(est, 0)
    near = valid & (est >= top - ESTIMATE_SLACK - tl.abs(top) * ESTIMATE_SLACK_REL)
    if (tl.sum(near.to(tl.int32), 0) == 1) & (top > float("-inf")):
        pick = tl.min(tl.where(near, ids, V), 0)
        best = tl.max(tl.where(near, l, float("-inf")), 0) + _gumbel(key, pick)
    else:
        score = tl.where(valid, l + _gumbel(key, ids), float("-inf"))
        best = tl.max(score, 0)
        pick = tl.min(tl.where(score == best, ids, V), 0)
    return best, pick


@triton.jit
def _order_key(l):
    """float32 -> int64 key with the same order (for non-NaN values)."""
    b = l.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(b >= 0, b + 2147483648, 2147483647 - (b & 2147483647))


@triton.jit
def _exp_from(l, m):
    """exp(l - m) for m = max(l), 1 where l is m (also when m is infinite): the reference's
    exp_from. l - m <= 0 but where both are the same infinity (NaN), and min() returns the
    other operand of a NaN (minnum): one instruction where a compare and a select were two,
    in loops that run over the whole row up to 63 times (a streamed top-p row)."""
    return tl.exp(tl.minimum(l - m, 0.0))


@triton.jit
def _load_scaled(ptrs, ok, t):
    """Logits / temperature, NaN as -inf (never sampled, as in the reference); -inf where not
    ok."""
    l = tl.load(ptrs, mask=ok, other=float("-inf"))
    return tl.maximum(l, float("-inf")) / t   # max() returns the other operand of a NaN


@triton.jit
def _kth_key(keys, valid, k):
    """The k-th largest key among `valid` (0 if fewer than k are valid): 32-step bisection."""
    lo = tl.zeros((), dtype=tl.int64)
    hi = tl.full((), 4294967296, dtype=tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        big = tl.sum(((keys >= mid) & valid).to(tl.int32), 0) >= k
        lo = tl.where(big, mid, lo)
        hi = tl.where(big, hi, mid)
    return lo


@triton.jit
def _group_floor(keys, valid, k, CHUNK: tl.constexpr, GROUPS: tl.constexpr):
    """A key with at least k valid keys at or above it and not above the k-th largest (k <=
    GROUPS): the k-th largest of the GROUPS group maxima (the k groups of the largest maxima
    each hold one). Taking every key at or above it keeps the chunk's top k and their ties in
    a few reductions, where the bisection takes 32; random logits at k = 40 (4,096 a chunk, 64
    groups) put 61 keys there on average, 87 at most in 2,000 chunks, under KCAP."""
    g = tl.max(tl.reshape(tl.where(valid, keys, -1), (GROUPS, CHUNK // GROUPS)), 1)   # [G]
    above = tl.sum((g[None, :] > g[:, None]).to(tl.int32), 1)      # [G] maxima above each
    return tl.min(tl.where(above < k, g, 4294967296), 0)


@triton.jit
def _row_params(Temp, TopK, TopP, row, V, KCAP: tl.constexpr):
    temp = tl.load(Temp + row).to(tl.float32)
    greedy = temp <= 0.0
    top_k = tl.load(TopK + row)
    top_p = tl.load(TopP + row).to(tl.float32)
    k_on = (~greedy) & (top_k > 0) & (top_k < V)
    p_on = (~greedy) & (top_p < 1.0)
    p_alone = p_on & ~k_on
    cand = (k_on & (top_k <= KCAP)) | p_alone
    k_cand = tl.where(k_on, top_k, KCAP)    # top-p alone: the KCAP largest
    return tl.where(greedy, 1.0, temp), greedy, k_cand, top_p, k_on, p_on, p_alone, cand


@triton.jit(**per_batch(pointers=ROW_PARAMS))
def _sample_chunk_kernel(Logits, Temp, TopK, TopP, Seeds, Pos, CandV, CandI, BestV, BestI,
                         ChunkZ, Overflow, stride_l, V, NC, CHUNK: tl.constexpr,
                         KCAP: tl.constexpr, GROUPS: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row, c = tl.program_id(0), tl.program_id(1)
    t, greedy, top_k, top_p, k_on, p_on, p_alone, cand = _row_params(Temp, TopK, TopP, row, V,
                                                                      KCAP)
    idx = c * CHUNK + tl.arange(0, CHUNK)                                     # [C]
    ok = idx < V
    l = _load_scaled(Logits + row.to(tl.int64) * stride_l + idx, ok, t)
    score = tl.where(ok, l, float("-inf"))
    if (~greedy) & (~k_on) & (~p_on):      # plain sampling: the chunk's best l + gumbel
        best, best_i = _noisy_argmax(l, idx, ok, _row_key(Seeds, Pos, row), V)
    else:
        best = tl.max(score, 0)
        best_i = tl.min(tl.where(score == best, idx, V), 0)
    slot = row.to(tl.int64) * NC + c
    tl.store(BestV + slot, best)
    tl.store(BestI + slot, best_i)
    if p_alone:   # the chunk's mass (no -inf - -inf when the chunk is all -inf)
        tl.store(ChunkZ + slot, tl.sum(tl.where(score > float("-inf"), _exp_from(l, best), 0.0),
                                       0))
    if cand:   # the elements above the chunk's k-th largest first, then its ties
        keys = _order_key(l)
        kth = tl.full((), -1, dtype=tl.int64)           # under every key: all the chunk
        if top_k <= GROUPS:
            kth = _group_floor(keys, ok, top_k, CHUNK, GROUPS)
        if tl.sum((ok & (keys >= kth)).to(tl.int32), 0) > KCAP:
            kth = _kth_key(keys, ok, top_k)
        above = ok & (keys > kth)                                            # [C]
        tie = ok & (keys == kth)                                             # [C]
        at = tl.where(above, tl.cumsum(above.to(tl.int32), 0) - 1,
                      tl.sum(above.to(tl.int32), 0) + tl.cumsum(tie.to(tl.int32), 0) - 1)
        n_take = tl.sum((above | tie).to(tl.int32), 0)
        tl.store(Overflow + slot, (n_take > KCAP).to(tl.int32))   # ties beyond KCAP slots
        base = slot * KCAP
        keep = (above | tie) & (at < KCAP)
        tl.store(CandV + base + at, l, mask=keep)
        tl.store(CandI + base + at, idx, mask=keep)
        j = tl.arange(0, KCAP)
        pad = j >= n_take
        tl.store(CandV + base + j, tl.full([KCAP], float("-inf"), tl.float32), mask=pad)
        tl.store(CandI + base + j, tl.full([KCAP], 0, tl.int32) + V, mask=pad)


@triton.jit
def _top_p_floor(e, z, top_p):
    """Smallest e_i whose strictly-larger mass is < top_p * z: bisection over float bits."""
    lo = tl.zeros((), dtype=tl.int32)               # bits of 0.0: predicate false
    hi = tl.full((), 1065353216, dtype=tl.int32)    # bits of 1.0 (= max e): predicate true
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        x = mid.to(tl.float32, bitcast=True)
        pred = tl.sum(tl.where(e > x, e, 0.0), 0) < top_p * z
        hi = tl.where(pred, mid, hi)
        lo = tl.where(pred, lo, mid)
    return hi.to(tl.float32, bitcast=True)


@triton.jit
def _load_candidates(CandV, CandI, row, NC, V, KCAP: tl.constexpr, NCAND: tl.constexpr):
    """The row's stage-1 candidates: values, token ids (V for none), validity; [NCAND] each."""
    j = tl.arange(0, NCAND)
    base = row.to(tl.int64) * NC * KCAP
    inb = j < NC * KCAP
    vals = tl.load(CandV + base + j, mask=inb, other=float("-inf"))
    ids = tl.load(CandI + base + j, mask=inb, other=V)
    return vals, ids, ids < V


@triton.jit
def _candidate_mass(CandV, CandI, row, NC, V, m, KCAP: tl.constexpr, NCAND: tl.constexpr):
    """sum(exp(l - m)) over the row's candidates: at least the top KCAP's mass."""
    vals, ids, valid = _load_candidates(CandV, CandI, row, NC, V, KCAP, NCAND)
    return tl.sum(tl.where(valid, _exp_from(vals, m), 0.0), 0)


@triton.jit
def _finish_candidates(CandV, CandI, TopV, TopI, row, NC, V, top_k, top_p, p_on, p_alone,
                       z_row, key, KCAP: tl.constexpr, NCAND: tl.constexpr,
                       CAND_GROUPS: tl.constexpr, NTOP: tl.constexpr, BLOCK_J: tl.constexpr):
    """(token, exact). With top-k, top-p renormalizes over the top k. Top-p alone (top_k =
    KCAP): z_row is the whole row's mass, and the result is exact only if the top KCAP hold
    top_p of it (otherwise the caller streams the row). The candidates at or above a floor
    under the k-th largest (`_group_floor` of CAND_GROUPS groups, else the bisected k-th
    itself) are ranked pairwise when no more than NTOP (`_finish_ranked`); only ties at the
    k-th beyond NTOP take the bisections over every candidate."""
    vals, ids, valid = _load_candidates(CandV, CandI, row, NC, V, KCAP, NCAND)
    keys = _order_key(vals)
    floor = tl.full((), -1, dtype=tl.int64)                 # under every key
    if top_k <= CAND_GROUPS:
        floor = _group_floor(keys, valid, top_k, NCAND, CAND_GROUPS)
    if tl.sum((valid & (keys >= floor)).to(tl.int32), 0) > NTOP:
        floor = _kth_key(keys, valid, top_k)
    sel = valid & (keys >= floor)
    if tl.sum(sel.to(tl.int32), 0) <= NTOP:
        tok, exact = _finish_ranked(vals, ids, sel, TopV + row.to(tl.int64) * NTOP,
                                    TopI + row.to(tl.int64) * NTOP, V, top_k, top_p, p_on,
                                    p_alone, z_row, key, NTOP, BLOCK_J)
    else:   # floor is the k-th largest, tied more than NTOP times
        _, e, z_keep, z = _kept_mass(vals, sel, p_alone, z_row)
        keep = sel
        if p_on:
            keep = keep & (e >= _top_p_floor(e, z, top_p))
        tok = _noisy_argmax(vals, ids, keep, key, V)[1]
        exact = (~p_alone) | (z_keep >= top_p * z)
    return tok, exact


@triton.jit
def _kept_mass(vals, keep, p_alone, z_row):
    """(m, e, z_keep, z) of the top-k's `keep` tokens: their max, e = exp(l - m) (0 where not
    kept) and its sum; z, top-p's total: z_keep, or the whole row's z_row for top-p alone."""
    m = tl.max(tl.where(keep, vals, float("-inf")), 0)
    e = tl.where(keep, _exp_from(vals, m), 0.0)
    z_keep = tl.sum(e, 0)
    return m, e, z_keep, tl.where(p_alone, z_row, z_keep)


@triton.jit
def _finish_ranked(vals, ids, sel, TopV, TopI, V, top_k, top_p, p_on, p_alone, z_row, key,
                   NTOP: tl.constexpr, BLOCK_J: tl.constexpr):
    """_finish_candidates on the (at most NTOP) `sel` candidates, moved to the row's TopV /
    TopI slots: a token is in the top k when fewer than k keys are strictly larger, and in the
    nucleus when the mass of the e strictly larger is < top_p * z, both counted pairwise
    (BLOCK_J columns at a time): a few reductions where the bisections take 63."""
    at = tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(TopV + at, vals, mask=sel)
    tl.store(TopI + at, ids, mask=sel)
    n = tl.sum(sel.to(tl.int32), 0)
    tl.debug_barrier()       # the stores are visible to this program's threads after it
    i = tl.arange(0, NTOP)
    ok = i < n
    tv = tl.load(TopV + i, mask=ok, other=float("-inf"))
    ti = tl.load(TopI + i, mask=ok, other=V)
    tk = _order_key(tv)
    greater = tl.zeros([NTOP], dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        kj = _order_key(tl.load(TopV + j, mask=j < n, other=float("-inf")))
        greater += tl.sum(((kj[None, :] > tk[:, None]) & (j < n)[None, :]).to(tl.int32), 1)
    keep = ok & (greater < top_k)
    kth = tl.min(tl.where(keep, tk, 4294967296), 0)
    m, e, z_keep, z = _kept_mass(tv, keep, p_alone, z_row)
    if p_on:
        above = tl.zeros([NTOP], dtype=tl.float32)
        for j0 in range(0, n, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            vj = tl.load(TopV + j, mask=j < n, other=float("-inf"))
            ej = tl.where((j < n) & (_order_key(vj) >= kth), _exp_from(vj, m), 0.0)
            above += tl.sum(tl.where(ej[None, :] > e[:, None], ej[None, :], 0.0), 1)
        keep = keep & (above < top_p * z)
    return _noisy_argmax(tv, ti, keep, key, V)[1], (~p_alone) | (z_keep >= top_p * z)


@triton.jit
def _finish_stream(base, V, t, k_on, top_k, top_p, p_on, key, BLOCK_V: tl.constexpr):
    """Top-p (and top-k > KCAP) on the whole row: passes over the vocabulary."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        m = tl.maximum(m, tl.max(_load_scaled(base + v0 + offs, v0 + offs < V, t), 0))
    lo = tl.zeros((), dtype=tl.int64)
    hi = tl.full((), 4294967296, dtype=tl.int64)
    for _ in range(tl.where(k_on, 32, 0)):
        mid = lo + (hi - lo) // 2
        cnt = tl.zeros((), dtype=tl.int32)
        for v0 in range(0, V, BLOCK_V):
            ok = v0 + offs < V
            l = _load_scaled(base + v0 + offs, ok, t)
            cnt += tl.sum(((_order_key(l) >= mid) & ok).to(tl.int32), 0)
        big = cnt >= top_k
        lo = tl.where(big, mid, lo)
        hi = tl.where(big, hi, mid)
    z = tl.zeros((), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + offs < V
        l = _load_scaled(base + v0 + offs, ok, t)
        z += tl.sum(tl.where(ok & (_order_key(l) >= lo), _exp_from(l, m), 0.0), 0)
    plo = tl.zeros((), dtype=tl.int32)
    phi = tl.full((), 1065353216, dtype=tl.int32)
    for _ in range(tl.where(p_on, 31, 0)):
        mid = plo + (phi - plo) // 2
        x = mid.to(tl.float32, bitcast=True)
        s = tl.zeros((), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            ok = v0 + offs < V
            l = _load_scaled(base + v0 + offs, ok, t)
            e = tl.where(ok & (_order_key(l) >= lo), _exp_from(l, m), 0.0)
            s += tl.sum(tl.where(e > x, e, 0.0), 0)
        pred = s < top_p * z
        phi = tl.where(pred, mid, phi)
        plo = tl.where(pred, plo, mid)
    e_min = tl.where(p_on, phi.to(tl.float32, bitcast=True), 0.0)
    best = tl.full((), float("-inf"), dtype=tl.float32)
    best_i = tl.zeros((), dtype=tl.int32) + V
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        ok = idx < V
        l = _load_scaled(base + idx, ok, t)
        keep = ok & (_order_key(l) >= lo) & (_exp_from(l, m) >= e_min)
        cmax, cidx = _noisy_argmax(l, idx, keep, key, V)
        take = cmax > best
        best_i = tl.where(take, cidx, best_i)
        best = tl.where(take, cmax, best)
    return best_i


@triton.jit(**per_batch(pointers=ROW_PARAMS))
def _sample_finish_kernel(Logits, Temp, TopK, TopP, Seeds, Pos, CandV, CandI, BestV, BestI,
                          ChunkZ, Overflow, Out, TopV, TopI, stride_l, V, NC,
                          KCAP: tl.constexpr, NCAND: tl.constexpr, CAND_GROUPS: tl.constexpr,
                          NTOP: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_NC: tl.constexpr,
                          BLOCK_V: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0)
    t, greedy, top_k, top_p, k_on, p_on, p_alone, cand = _row_params(Temp, TopK, TopP, row, V,
                                                                      KCAP)
    key = _row_key(Seeds, Pos, row)
    c = tl.arange(0, BLOCK_NC)
    bv = tl.load(BestV + row.to(tl.int64) * NC + c, mask=c < NC, other=float("-inf"))
    bi = tl.load(BestI + row.to(tl.int64) * NC + c, mask=c < NC, other=V)
    top = tl.max(bv, 0)
    tok = tl.min(tl.where(bv == top, bi, V), 0)            # no filter (or greedy)
    stream = (k_on | p_on) & ~cand
    if cand:
        # a chunk that dropped ties at its k-th value: its candidates may miss some of the set
        stream = tl.max(tl.load(Overflow + row.to(tl.int64) * NC + c, mask=c < NC, other=0),
                        0) > 0
        z_row = 0.0
        if p_alone:   # the row's mass relative to its max, from the chunks'
            cz = tl.load(ChunkZ + row.to(tl.int64) * NC + c, mask=c < NC, other=0.0)
            z_row = tl.sum(tl.where(bv > float("-inf"), cz * _exp_from(bv, top), 0.0), 0)
            # all candidates' mass bounds the top KCAP's: a flat row streams without trying
            stream = stream | (_candidate_mass(CandV, CandI, row, NC, V, top, KCAP, NCAND)
                               < top_p * z_row)
        if ~stream:
            tok, exact = _finish_candidates(CandV, CandI, TopV, TopI, row, NC, V, top_k, top_p,
                                            p_on, p_alone, z_row, key, KCAP, NCAND,
                                            CAND_GROUPS, NTOP, BLOCK_J)
            stream = ~exact
    if stream:
        tok = _finish_stream(Logits + row.to(tl.int64) * stride_l, V, t, k_on, top_k, top_p,
                             p_on, key, BLOCK_V)
    tl.store(Out + row, tl.where(tok < V, tok, 0).to(tl.int32))   # nothing sampleable: 0


@dataclass(frozen=True)
class SampleSizes:
    """chunk: vocabulary tokens per stage-1 program; kcap: top-k candidates kept per chunk
    (top-k above it streams the row); block_v: tokens per pass of a streamed row."""
    chunk: int
    kcap: int
    block_v: int


def sample_sizes() -> SampleSizes:
    """The defaults; small in the interpreter."""
    if interpreting():
        return SampleSizes(chunk=64, kcap=64, block_v=128)
    return SampleSizes(chunk=4096, kcap=128, block_v=2048)


def chunk_groups(chunk: int) -> int:
    """Groups of a chunk for `_group_floor`: the power of two nearest sqrt(chunk) from below
    (64 of 64 tokens in a chunk of 4,096), so that the GROUPS x GROUPS comparison of their
    maxima costs one pass over the chunk."""
    return 1 << (chunk.bit_length() - 1) // 2


def candidate_groups(ncand: int) -> int:
    """Groups of a row's candidate slots for stage 2's `_group_floor`: up to 128 (top-k up to
    128 then gets a floor), at least 4 slots each."""
    return min(MAX_CANDIDATE_GROUPS, max(2, ncand // 4))


@register("sample", backend="triton", priority=PRIORITY, supports=on_cuda)
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
           sizes: SampleSizes | None = None) -> torch.Tensor:
    """logits: [B, V] float32 -> tokens [B] int32. sizes: None for `sample_sizes`."""
    b, v = logits.shape
    logits = logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(b, dtype=torch.int32, device=logits.device)
    if b == 0:
        return out
    sizes = sample_sizes() if sizes is None else sizes
    chunk, kcap = sizes.chunk, sizes.kcap
    nc = triton.cdiv(v, chunk)
    dev = logits.device
    cand_v = torch.empty(b, nc * kcap, dtype=torch.float32, device=dev)      # [B, NC*KCAP]
    cand_i = torch.empty(b, nc * kcap, dtype=torch.int32, device=dev)
    best_v = torch.empty(b, nc, dtype=torch.float32, device=dev)              # [B, NC]
    best_i = torch.empty(b, nc, dtype=torch.int32, device=dev)
    chunk_z = torch.empty(b, nc, dtype=torch.float32, device=dev)             # top-p alone
    overflow = torch.empty(b, nc, dtype=torch.int32, device=dev)
    ntop = 2 * kcap              # top-p alone ranks the top KCAP: room for as many ties
    top_v = torch.empty(b, ntop, dtype=torch.float32, device=dev)             # [B, NTOP]
    top_i = torch.empty(b, ntop, dtype=torch.int32, device=dev)
    args = (logits, temperature.float(), top_k.int(), top_p.float(), seeds.long(),
            positions.long(), cand_v, cand_i, best_v, best_i, chunk_z, overflow)
    pdl = pdl_launch(dev)
    _sample_chunk_kernel[(b, nc)](*args, logits.stride(0), v, nc, CHUNK=chunk, KCAP=kcap,
                                  GROUPS=chunk_groups(chunk), num_warps=8, **pdl)
    ncand = next_pow2(nc * kcap)
    _sample_finish_kernel[(b,)](*args, out, top_v, top_i, logits.stride(0), v, nc, KCAP=kcap,
                                NCAND=ncand, CAND_GROUPS=candidate_groups(ncand), NTOP=ntop,
                                BLOCK_J=RANK_COLUMNS, BLOCK_NC=max(2, next_pow2(nc)),
                                BLOCK_V=sizes.block_v, num_warps=8, **pdl)
    return out
