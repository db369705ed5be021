"""Registry entries of the Triton paged attention (GQA and MLA, decode and extend)."""
from __future__ import annotations

import torch

from kernels.registry import register
from kernels.triton.attention import paged_attention
from kernels.triton.common import on_cuda_half
from kernels.triton.mla_decode import default_nc, mla_decode_chunked

PRIORITY = 10


def _gqa_ok(f) -> bool:
    return on_cuda_half(f) and f.get("head_dim", 128) <= 256


def _mla_ok(f) -> bool:
    return on_cuda_half(f) and f.get("kv_lora_rank", 512) <= 512 and f.get("rope_dim", 64) <= 128


@register("decode_attention", backend="triton", priority=PRIORITY, supports=_gqa_ok)
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                     scale: float, num_splits: int | None = None) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, Dv]; split-KV chosen from the page table width."""
    return paged_attention(q, None, k_cache, None, v_cache, page_table, None, seq_lens,
                           page_size, scale, num_splits)


@register("extend_attention", backend="triton", priority=PRIORITY, supports=_gqa_ok)
def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
                     page_size: int, scale: float) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, Dv], causal over each row's cached prefix + new tokens."""
    return paged_attention(q, None, k_cache, None, v_cache, page_table, query_start, seq_lens,
                           page_size, scale)


@register("mla_decode", backend="triton", priority=PRIORITY, supports=_mla_ok)
def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
               page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, scale: float,
               num_splits: int | None = None) -> torch.Tensor:
    """q_latent: [B, H, L], q_rope: [B, H, R], kv_cache: [S, L+R] -> [B, H, L]. The
    chunked-latent kernel (kernels/triton/mla_decode.py, 1-22% faster on an H100: see
    docs/KERNELS.md) serves latents it can cut into power-of-two chunks (DeepSeek's 512);
    the generic paged kernel serves the rest."""
    if default_nc(q_latent.shape[-1]):
        return mla_decode_chunked(q_latent, q_rope, kv_cache, page_table, seq_lens, page_size,
                                  scale, num_splits)
    return mla_decode_generic(q_latent, q_rope, kv_cache, page_table, seq_lens, page_size,
                              scale, num_splits)


def mla_decode_generic(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                       page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                       scale: float, num_splits: int | None = None) -> torch.Tensor:
    """mla_decode on the generic paged kernel, any latent width (the registered op's fallback;
    also the baseline of scripts/bench_kernels.py --tune-mla)."""
    lat = q_latent.shape[-1]
    c = kv_cache[:, None, :lat]                                     # [S, 1, L]
    kr = kv_cache[:, None, lat:]                                    # [S, 1, R]
    return paged_attention(q_latent, q_rope, c, kr, None, page_table, None, seq_lens,
                           page_size, scale, num_splits)


@register("mla_extend", backend="triton", priority=PRIORITY, supports=_mla_ok)
def mla_extend(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
               page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
               page_size: int, scale: float) -> torch.Tensor:
    """q_latent: [T, H, L], q_rope: [T, H, R] -> [T, H, L], causal."""
    lat = q_latent.shape[-1]
    c, kr = kv_cache[:, None, :lat], kv_cache[:, None, lat:]        # [S,1,L], [S,1,R]
    return paged_attention(q_latent, q_rope, c, kr, None, page_table, query_start, seq_lens,
                           page_size, scale)
