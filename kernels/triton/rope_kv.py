"""RoPE and the KV-cache write in Triton; `rope_store_kv` does both in one pass.

Rotation by gather: element d < R of a head pairs with partner p(d) (NeoX: d +- R/2; GPT-J:
d ^ 1) and frequency f(d) (NeoX: d mod R/2; GPT-J: d // 2); out = x*cos + sign*x[p]*sin with
sign -1 on the first element of each pair. Dims >= R pass through. One program per token.

The caches' element format (kernels/reference/kv_cache.py): x / scale in the cache's dtype, and
for an FP8 cache (FP8, constexpr) saturated to +-448 first; a 16-bit cache has scale 1.0."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference.kv_cache import FP8_KV_DTYPE, FP8_MAX
from kernels.registry import register
from kernels.triton.common import PRIORITY, check, kv_dtype_ok, next_pow2, on_cuda, per_batch
from kernels.triton.pdl import pdl_begin, pdl_launch

FP8_LIMIT = tl.constexpr(FP8_MAX)   # jit functions read only constexpr globals


def _store_ok(f) -> bool:
    """The cache writers: CUDA, a float model dtype, a cache of that dtype or FP8."""
    return on_cuda(f) and kv_dtype_ok(f, fp8=True)


@triton.jit
def rotate_heads(X, tok, stride_t, stride_h, num_heads, d, cos, sin, partner, first, rot,
                  D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token tok's heads of X rotated, fp32 [BLOCK_H, BLOCK_D], and the mask of their real
    elements: x*cos + sign*x[partner]*sin on the rotated dims (rot), x elsewhere."""
    h = tl.arange(0, BLOCK_H)
    ok = (h[:, None] < num_heads) & (d[None, :] < D)
    base = X + tok * stride_t + h[:, None] * stride_h
    x = tl.load(base + d[None, :], mask=ok, other=0.0).to(tl.float32)                 # [H, D]
    xp = tl.load(base + partner[None, :], mask=ok & rot[None, :], other=0.0).to(tl.float32)
    xp = tl.where(first[None, :], -xp, xp)
    return tl.where(rot[None, :], x * cos[None, :] + xp * sin[None, :], x), ok


@triton.jit
def _store_heads(Base, row, stride_s, stride_h, x, ok, BLOCK_H: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """x [BLOCK_H, BLOCK_D] -> Base[row, h, d] where ok, in Base's dtype."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    tl.store(Base + row * stride_s + h[:, None] * stride_h + d[None, :],
             x.to(Base.dtype.element_ty), mask=ok)


@triton.jit
def cache_value(x, inv_scale, Cache, FP8: tl.constexpr):
    """x as the cache stores it, in the cache's dtype: x * inv_scale (= x / scale; a product,
    exact for scale 1), saturated when FP8."""
    y = x.to(tl.float32) * inv_scale
    if FP8:
        y = tl.clamp(y, -FP8_LIMIT, FP8_LIMIT)
    return y.to(Cache.dtype.element_ty)


@triton.jit
def store_cache_heads(Cache, slot, stride_s, stride_h, x, ok, inv_scale, FP8: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """x [BLOCK_H, BLOCK_D] -> Cache[slot, h, d] where ok, as `cache_value`."""
    _store_heads(Cache, slot, stride_s, stride_h, cache_value(x, inv_scale, Cache, FP8), ok,
                 BLOCK_H, BLOCK_D)


@triton.jit
def load_heads(X, tok, stride_t, stride_h, num_heads, D: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Token tok's heads of X, [BLOCK_H, BLOCK_D] in X's dtype, and the mask of real ones."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    ok = (h[:, None] < num_heads) & (d[None, :] < D)
    return tl.load(X + tok * stride_t + h[:, None] * stride_h + d[None, :], mask=ok), ok


@triton.jit
def _rms_norm_heads(v, ok, W, eps, DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    """v [BLOCK_H, BLOCK_DV] (masked elements 0) normed over its DV real dims and scaled by
    W [DV], in v's dtype: the rms_norm kernel's arithmetic (elementwise.py) a row."""
    v32 = v.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(v32 * v32, 1) / DV + eps)                           # [H]
    dv = tl.arange(0, BLOCK_DV)
    w = tl.load(W + dv, mask=dv < DV, other=0.0).to(tl.float32)                     # [DV]
    return tl.where(ok, v32 * inv[:, None] * w[None, :], 0.0).to(v.dtype)


@triton.jit
def rope_rows(tok, Pos, CosSin, stride_cs, R, BLOCK_D: tl.constexpr, IS_NEOX: tl.constexpr):
    """What rotating token tok takes, over dims d = arange(BLOCK_D): (d, cos and sin of its
    position fp32 [BLOCK_D], each dim's partner, whether it is its pair's first, whether it
    is rotated (d < R))."""
    d = tl.arange(0, BLOCK_D)
    half = R // 2
    rot = d < R
    if IS_NEOX:
        first = d < half
        partner = tl.where(first, d + half, d - half)
        freq = tl.where(first, d, d - half)
    else:
        first = (d % 2) == 0
        partner = d ^ 1
        freq = d // 2
    pos = tl.load(Pos + tok).to(tl.int64)
    cos = tl.load(CosSin + pos * stride_cs + freq, mask=rot, other=1.0).to(tl.float32)   # [D]
    sin = tl.load(CosSin + pos * stride_cs + half + freq, mask=rot, other=0.0).to(tl.float32)
    return d, cos, sin, partner, first, rot


@triton.jit
def rope_kv_token(tok, Q, K, V, Pos, CosSin, QOut, KOut, KCache, VCache, Slots, VNormW,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                  stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
                  stride_kcs, stride_kch, stride_vcs, stride_vch, inv_k_scale, inv_v_scale,
                  v_norm_eps, HQ, HK, R, D: tl.constexpr, DV: tl.constexpr,
                  BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr, IS_NEOX: tl.constexpr, STORE: tl.constexpr,
                  FP8: tl.constexpr, V_NORM: tl.constexpr, DO_Q, DO_KV):
    """Token tok's q and k rotated; with STORE the rotated k and v written at the token's
    slot (skipped for slot < 0), v first RMS-normed by VNormW when V_NORM (MLA's latent: the
    kv_a layernorm in this launch instead of its own). DO_Q / DO_KV: q's part, k's and v's
    (both True, or one each for two programs sharing a token)."""
    d, cos, sin, partner, first, rot = rope_rows(tok, Pos, CosSin, stride_cs, R, BLOCK_D,
                                                 IS_NEOX)
    if DO_Q:
        q, qok = rotate_heads(Q, tok, stride_qt, stride_qh, HQ, d, cos, sin, partner, first,
                               rot, D, BLOCK_HQ)
        _store_heads(QOut, tok, stride_qot, stride_qoh, q, qok, BLOCK_HQ, BLOCK_D)
    if DO_KV:
        _rotate_store_kv(tok, K, V, KOut, KCache, VCache, Slots, VNormW, stride_kt, stride_kh,
                         stride_vt, stride_vh, stride_kot, stride_koh, stride_kcs, stride_kch,
                         stride_vcs, stride_vch, inv_k_scale, inv_v_scale, v_norm_eps, HK, d,
                         cos, sin, partner, first, rot, D, DV, BLOCK_HK, BLOCK_D, BLOCK_DV,
                         STORE, FP8, V_NORM)


@triton.jit
def _rotate_store_kv(tok, K, V, KOut, KCache, VCache, Slots, VNormW, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_kot, stride_koh, stride_kcs, stride_kch,
                     stride_vcs, stride_vch, inv_k_scale, inv_v_scale, v_norm_eps, HK, d, cos,
                     sin, partner, first, rot, D: tl.constexpr, DV: tl.constexpr,
                     BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     STORE: tl.constexpr, FP8: tl.constexpr, V_NORM: tl.constexpr):
    """rope_kv_token's k part: k rotated into KOut, and with STORE k and v into the caches."""
    k, kok = rotate_heads(K, tok, stride_kt, stride_kh, HK, d, cos, sin, partner, first, rot,
                           D, BLOCK_HK)
    _store_heads(KOut, tok, stride_kot, stride_koh, k, kok, BLOCK_HK, BLOCK_D)
    if STORE:
        slot = tl.load(Slots + tok).to(tl.int64)
        if slot >= 0:
            store_cache_heads(KCache, slot, stride_kcs, stride_kch, k, kok, inv_k_scale, FP8,
                               BLOCK_HK, BLOCK_D)
            v, vok = load_heads(V, tok, stride_vt, stride_vh, HK, DV, BLOCK_HK, BLOCK_DV)
            if V_NORM:
                v = _rms_norm_heads(v, vok, VNormW, v_norm_eps, DV, BLOCK_DV)
            store_cache_heads(VCache, slot, stride_vcs, stride_vch, v, vok, inv_v_scale, FP8,
                               BLOCK_HK, BLOCK_DV)


@triton.jit(**per_batch(pointers=("Pos", "Slots")))
def _rope_kv_kernel(Q, K, V, Pos, CosSin, QOut, KOut, KCache, VCache, Slots, VNormW,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
                    stride_kcs, stride_kch, stride_vcs, stride_vch, inv_k_scale, inv_v_scale,
                    v_norm_eps, HQ, HK, R, D: tl.constexpr, DV: tl.constexpr,
                    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, IS_NEOX: tl.constexpr, STORE: tl.constexpr,
                    FP8: tl.constexpr, V_NORM: tl.constexpr, PDL: tl.constexpr):
    """One token a program: `rope_kv_token`."""
    pdl_begin(PDL)
    rope_kv_token(tl.program_id(0).to(tl.int64), Q, K, V, Pos, CosSin, QOut, KOut, KCache,
                  VCache, Slots, VNormW, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                  stride_vh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
                  stride_kcs, stride_kch, stride_vcs, stride_vch, inv_k_scale, inv_v_scale,
                  v_norm_eps, HQ, HK, R, D, DV, BLOCK_HQ, BLOCK_HK, BLOCK_D, BLOCK_DV, IS_NEOX,
                  STORE, FP8, V_NORM, True, True)


def _is_fp8(cache: torch.Tensor | None) -> bool:
    return cache is not None and cache.dtype == FP8_KV_DTYPE


def rope_kv_launch(q, k, v, positions, cos_sin, rotary_dim, is_neox, k_cache, v_cache,
                   slots, store: bool, k_scale: float = 1.0, v_scale: float = 1.0,
                   v_norm_weight: torch.Tensor | None = None, v_norm_eps: float = 0.0
                   ) -> tuple[tuple, dict, torch.Tensor, torch.Tensor]:
    """(arguments, constexprs) of `rope_kv_token` for this batch (checked), and the rotated
    outputs (q_out, k_out) it writes."""
    t, hq, d = q.shape
    hk = k.shape[1]
    check(q.stride(2) == 1 and k.stride(2) == 1, "rope: last dim of q and k must be contiguous")
    check(rotary_dim % 2 == 0 and rotary_dim <= d, f"rope: bad rotary_dim {rotary_dim}")
    check(cos_sin.stride(1) == 1, "rope: cos_sin rows must be contiguous")
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    dv = v.shape[-1]
    vc = v_cache if store else k_out
    kc = k_cache if store else k_out
    check(v_norm_weight is None or (v_norm_weight.shape == (dv,) and store),
          "rope_store_kv: v_norm_weight must be [Dv]")
    args = (q, k, v, positions, cos_sin, q_out, k_out, kc, vc, slots,
            q if v_norm_weight is None else v_norm_weight,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_sin.stride(0), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
            1.0 / k_scale, 1.0 / v_scale, float(v_norm_eps), hq, hk, rotary_dim)
    constexprs = dict(D=d, DV=dv, BLOCK_HQ=next_pow2(hq), BLOCK_HK=next_pow2(hk),
                      BLOCK_D=next_pow2(d), BLOCK_DV=next_pow2(dv), IS_NEOX=is_neox,
                      STORE=store, FP8=_is_fp8(kc), V_NORM=v_norm_weight is not None)
    return args, constexprs, q_out, k_out


def _launch(q, k, v, positions, cos_sin, rotary_dim, is_neox, k_cache, v_cache, slots,
            store: bool, k_scale: float = 1.0, v_scale: float = 1.0,
            v_norm_weight: torch.Tensor | None = None, v_norm_eps: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    args, constexprs, q_out, k_out = rope_kv_launch(
        q, k, v, positions, cos_sin, rotary_dim, is_neox, k_cache, v_cache, slots, store,
        k_scale, v_scale, v_norm_weight, v_norm_eps)
    if q.shape[0]:
        _rope_kv_kernel[(q.shape[0],)](*args, **constexprs, num_warps=4, **pdl_launch(q.device))
    return q_out, k_out


@register("rope", backend="triton", priority=PRIORITY, supports=on_cuda)
def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
         rotary_dim: int, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D] -> rotated (q, k)."""
    return _launch(q, k, k, positions, cos_sin, rotary_dim, is_neox, None, None, positions,
                   store=False)


@register("rope_store_kv", backend="triton", priority=PRIORITY, supports=_store_ok)
def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin: torch.Tensor, rotary_dim: int, is_neox: bool, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                  v_scale: float = 1.0, v_norm_weight: torch.Tensor | None = None,
                  v_norm_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """rope(q, k), and the rotated k with v written at slot_mapping (in the caches' format:
    k_scale / v_scale), in one pass; v RMS-normed first by v_norm_weight [Dv] if given."""
    check(k_cache.dtype == v_cache.dtype, "rope_store_kv: k_cache and v_cache dtypes differ")
    return _launch(q, k, v, positions, cos_sin, rotary_dim, is_neox, k_cache, v_cache,
                   slot_mapping, True, k_scale, v_scale, v_norm_weight, v_norm_eps)


@triton.jit(**per_batch(pointers=("Slots",)))
def _store_kv_kernel(K, V, KCache, VCache, Slots, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcs, stride_kch, stride_vcs, stride_vch, inv_k_scale, inv_v_scale,
                     HK, D: tl.constexpr, DV: tl.constexpr, BLOCK_HK: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, FP8: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_begin(PDL)
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + tok).to(tl.int64)
    if slot >= 0:
        k, kok = load_heads(K, tok, stride_kt, stride_kh, HK, D, BLOCK_HK, BLOCK_D)
        store_cache_heads(KCache, slot, stride_kcs, stride_kch, k, kok, inv_k_scale, FP8,
                           BLOCK_HK, BLOCK_D)
        v, vok = load_heads(V, tok, stride_vt, stride_vh, HK, DV, BLOCK_HK, BLOCK_DV)
        store_cache_heads(VCache, slot, stride_vcs, stride_vch, v, vok, inv_v_scale, FP8,
                           BLOCK_HK, BLOCK_DV)


@register("store_kv", backend="triton", priority=PRIORITY, supports=_store_ok)
def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k: [T, Hk, D], v: [T, Hk, Dv] -> caches at slot_mapping (negative slots skipped), in
    the caches' format (k_scale / v_scale)."""
    t, hk, d = k.shape
    dv = v.shape[-1]
    check(k.stride(2) == 1 and v.stride(2) == 1, "store_kv: last dim must be contiguous")
    check(k_cache.dtype == v_cache.dtype, "store_kv: k_cache and v_cache dtypes differ")
    if t == 0:
        return
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
                           v_cache.stride(0), v_cache.stride(1), 1.0 / k_scale, 1.0 / v_scale,
                           hk, D=d, DV=dv, BLOCK_HK=next_pow2(hk), BLOCK_D=next_pow2(d),
                           BLOCK_DV=next_pow2(dv), FP8=_is_fp8(k_cache), num_warps=4,
                           **pdl_launch(k.device))
