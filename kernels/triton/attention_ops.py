"""Registry entries of the Triton paged attention (GQA and MLA, decode and extend).

The GQA ops read 16-bit or FP8 (e4m3) caches (feature `kv_dtype`, the cache's dtype; absent:
the model's); the MLA ops read only a cache in the model's dtype, so the registry never
hands them an FP8 one."""
from __future__ import annotations

import torch

from kernels.registry import register
from kernels.triton.attention import AttentionTiles, paged_attention
from kernels.triton.common import PRIORITY, check, kv_dtype_ok, on_cuda_half
from kernels.triton.gqa_decode import NewTokens, gqa_decode
from kernels.triton.head_gemv import head_matmul
from kernels.triton.mla_decode import default_nc, mla_decode_chunked, mla_extend_per_token
from kernels.triton.prefill import contiguous_ok, prefill_attention
from kernels.triton.split_kv import DEFAULT_SIZING, SplitSizing


def _gqa_ok(f) -> bool:
    return on_cuda_half(f) and f.get("head_dim", 128) <= 256 and kv_dtype_ok(f, fp8=True)


def _mla_ok(f) -> bool:
    return (on_cuda_half(f) and f.get("kv_lora_rank", 512) <= 512
            and f.get("rope_dim", 64) <= 128 and kv_dtype_ok(f, fp8=False))


@register("decode_attention", backend="triton", priority=PRIORITY, supports=_gqa_ok)
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                     scale: float, num_splits: int | None = None,
                     sinks: torch.Tensor | None = None, window: int = 0, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, Dv]; split-KV chosen from the page table width (or the
    window). sinks [Hq] / window: GPT-OSS; k_scale / v_scale: an FP8 cache's
    (kernels/reference/attention.py). Without a window: gqa_decode.py's kernel (from 2 rows
    up its split merge runs in the last split); with one, the generic kernel."""
    if window == 0:
        return gqa_decode(q, k_cache, v_cache, page_table, seq_lens, page_size, scale,
                          num_splits, sinks=sinks, k_scale=k_scale, v_scale=v_scale)
    return paged_attention(q, None, k_cache, None, v_cache, page_table, None, seq_lens,
                           page_size, scale, num_splits, sinks=sinks, window=window,
                           k_scale=k_scale, v_scale=v_scale)


@register("rope_decode_attention", backend="triton", priority=PRIORITY,
          supports=lambda f: _gqa_ok(f) and not f.get("sliding_window"))
def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          positions: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int,
                          is_neox: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, page_table: torch.Tensor,
                          seq_lens: torch.Tensor, page_size: int, scale: float,
                          sinks: torch.Tensor | None = None, k_scale: float = 1.0,
                          v_scale: float = 1.0) -> torch.Tensor:
    """A decode step's rope, cache write and attention in gqa_decode.py's one launch (the
    rope_store_kv launch before it saved)."""
    new = NewTokens(k, v, positions, cos_sin, rotary_dim, is_neox, slot_mapping)
    return gqa_decode(q, k_cache, v_cache, page_table, seq_lens, page_size, scale, sinks=sinks,
                      k_scale=k_scale, v_scale=v_scale, new=new)


# The contiguous-K/V prefill gathers a cached prefix a little slower than the generic kernel,
# so it serves batches whose new tokens are at least this fraction of the widest row's keys
# (the page table's width: known on the host, no sync). From `python -m scripts.kernel_bench
# tune prefill` (docs/KERNELS.md, "Prefill")
CONTIGUOUS_MIN_NEW = 0.5


def use_contiguous(q: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                   page_table: torch.Tensor, page_size: int) -> bool:
    """extend_attention takes kernels/triton/prefill.py: the new K/V are given, that kernel
    applies to them, and they are mostly new keys (CONTIGUOUS_MIN_NEW)."""
    if k_new is None or v_new is None or not contiguous_ok(q, k_new, v_new):
        return False
    return q.shape[0] >= CONTIGUOUS_MIN_NEW * page_table.shape[1] * page_size


@register("extend_attention", backend="triton", priority=PRIORITY, supports=_gqa_ok)
def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
                     page_size: int, scale: float, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                     window: int = 0, k_scale: float = 1.0, v_scale: float = 1.0
                     ) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, Dv], causal over each row's cached prefix + new tokens. Given
    the new tokens' K/V (k_new / v_new [T, Hk, D]), kernels/triton/prefill.py reads them
    contiguously by tensor descriptors where `use_contiguous` says; else every key is
    gathered. sinks [Hq] / window: GPT-OSS; a window (a few tiles a program) always takes
    the gathering kernel, which starts at each program's window. k_scale / v_scale: an FP8
    cache's."""
    if window <= 0 and use_contiguous(q, k_new, v_new, page_table, page_size):
        return prefill_attention(q, k_cache, v_cache, k_new, v_new, page_table, query_start,
                                 seq_lens, page_size, scale, sinks=sinks, k_scale=k_scale,
                                 v_scale=v_scale)
    return paged_attention(q, None, k_cache, None, v_cache, page_table, query_start, seq_lens,
                           page_size, scale, sinks=sinks, window=window, k_scale=k_scale,
                           v_scale=v_scale)


@register("mla_decode", backend="triton", priority=PRIORITY, supports=_mla_ok)
def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
               page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, scale: float,
               num_splits: int | None = None, w_uv: torch.Tensor | None = None
               ) -> torch.Tensor:
    """q_latent: [B, H, L], q_rope: [B, H, R], kv_cache: [S, L+R] -> [B, H, L], or with w_uv
    [H, L, Dv] projected per head, [B, H, Dv]. The chunked-latent kernel
    (kernels/triton/mla_decode.py, faster: docs/KERNELS.md) serves latents it can cut into
    power-of-two chunks (DeepSeek's 512); the generic paged kernel serves the rest."""
    if default_nc(q_latent.shape[-1]):
        return mla_decode_chunked(q_latent, q_rope, kv_cache, page_table, seq_lens, page_size,
                                  scale, num_splits, w_uv=w_uv)
    out = mla_decode_generic(q_latent, q_rope, kv_cache, page_table, seq_lens, page_size,
                             scale, num_splits)
    return out if w_uv is None else head_matmul(out, w_uv)


def mla_decode_generic(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                       page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                       scale: float, num_splits: int | None = None,
                       tiles: AttentionTiles | None = None,
                       sizing: SplitSizing = DEFAULT_SIZING) -> torch.Tensor:
    """mla_decode on the generic paged kernel, any latent width (the registered op's fallback;
    also the baseline of the MLA decode sweeps); tiles / sizing as `paged_attention`'s."""
    lat = q_latent.shape[-1]
    c = kv_cache[:, None, :lat]                                     # [S, 1, L]
    kr = kv_cache[:, None, lat:]                                    # [S, 1, R]
    return paged_attention(q_latent, q_rope, c, kr, None, page_table, None, seq_lens,
                           page_size, scale, num_splits, tiles=tiles, sizing=sizing)


# MLA extend launches of at most this many tokens run each token as a decode row of the chunked
# kernel (`mla_extend_per_token`), the rest the generic kernel's 64-row tiles (4 tokens x 16
# heads). H200, DeepSeek-V2-Lite's heads, graph replays over 8 layers (scripts/
# gpu_verify_attention.py --mla), us a launch per-token vs generic: verify rows B x (1 + k)
# over 2K keys 1x2 17 vs 27, 1x9 19 vs 46, 4x5 30 vs 76, 16x2 33 vs 78, 16x5 78 vs 230,
# 64x2 91 vs 242; a prefill chunk of 64 / 128 tokens over 2K 46 / 81 vs 137 / 235, 64 / 256
# over 16K 206 / 756 vs 919 / 1814. A row's keys are read once per token, the repeats from L2,
# which wins at every size measured: the limit is the largest measured, an extend graph's
# 256-token bucket (larger eager chunks attend decompressed from 80 tokens a row).
MLA_PER_TOKEN_MAX_TOKENS = 256


@register("mla_extend", backend="triton", priority=PRIORITY, supports=_mla_ok)
def mla_extend(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
               page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
               page_size: int, scale: float) -> torch.Tensor:
    """q_latent: [T, H, L], q_rope: [T, H, R] -> [T, H, L], causal. Launches of at most
    MLA_PER_TOKEN_MAX_TOKENS tokens take the chunked decode kernel a token a row; the rest
    the generic paged kernel."""
    lat = q_latent.shape[-1]
    if default_nc(lat) and q_latent.shape[0] <= MLA_PER_TOKEN_MAX_TOKENS:
        return mla_extend_per_token(q_latent, q_rope, kv_cache, page_table, query_start,
                                    seq_lens, page_size, scale)
    c, kr = kv_cache[:, None, :lat], kv_cache[:, None, lat:]        # [S,1,L], [S,1,R]
    return paged_attention(q_latent, q_rope, c, kr, None, page_table, query_start, seq_lens,
                           page_size, scale)


@register("mla_prefill", backend="triton", priority=PRIORITY, supports=_mla_ok)
def mla_prefill(q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor,
                k_rope: torch.Tensor, v: torch.Tensor, query_start: torch.Tensor,
                seq_lens: torch.Tensor, scale: float, num_splits: int | None = None
                ) -> torch.Tensor:
    """Decompressed MLA ([T, H, Dn] + [T, H, R] queries, keys [N, H, Dn] + shared [N, R],
    values [N, H, Dv], each row's keys contiguous) on the generic paged kernel: the keys are
    seen as a cache of 1-key pages whose table maps row b to rows kv_start[b] + j, and the
    shared rope key as a head axis of stride 0. num_splits: None for the split sizing."""
    check(k_rope.dim() == 2 and k_rope.shape[0] == k_nope.shape[0],
          "k_rope must be [N, R] with N = k_nope's rows")
    n, heads = k_nope.shape[0], k_nope.shape[1]
    kv_start = torch.cumsum(seq_lens, 0) - seq_lens                         # [B]
    table = kv_start[:, None] + torch.arange(max(n, 1), device=k_nope.device)  # [B, N]
    table = table.clamp_(max=max(n - 1, 0)).to(torch.int32)
    k_rope_heads = k_rope[:, None, :].expand(n, heads, k_rope.shape[-1])   # [N, H, R]
    return paged_attention(q_nope, q_rope, k_nope, k_rope_heads, v, table, query_start,
                           seq_lens, 1, scale, num_splits)
