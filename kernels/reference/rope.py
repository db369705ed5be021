"""Rotary position embedding (NeoX halves or GPT-J interleaved pairs) and its fusion with the
KV-cache write."""
from __future__ import annotations

import torch

from kernels.reference.kv_cache import store_kv
from kernels.reference.norm import rms_norm
from kernels.registry import register
from kernels.step_memo import memoized


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
            is_neox: bool) -> torch.Tensor:
    # x: [T, H, D]; cos, sin: [T, R/2] float32 -> [T, H, D] in x.dtype
    x32 = x.float()
    rot, tail = x32[..., :rotary_dim], x32[..., rotary_dim:]
    c, s = cos[:, None, :], sin[:, None, :]                      # [T, 1, R/2]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)                            # [T, H, R/2] each
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]                  # [T, H, R/2] each
        out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    if tail.shape[-1]:
        out = torch.cat([out, tail], dim=-1)
    return out.to(x.dtype)


def _cos_sin(positions: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `positions`: cos, sin [T, R/2] float32 (every layer of a step asks)."""
    cs = cos_sin[positions.long()].float()                       # [T, R]
    return cs[:, : rotary_dim // 2], cs[:, rotary_dim // 2: rotary_dim]


@register("rope", backend="torch", priority=0)
def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
         rotary_dim: int, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D], positions: [T], cos_sin: [max_pos, R] (cos | sin)
    -> (q, k) rotated on their first R dims (new tensors)."""
    cos, sin = memoized(("rope_cos_sin", rotary_dim), (positions, cos_sin),
                        lambda: _cos_sin(positions, cos_sin, rotary_dim))
    return _rotate(q, cos, sin, rotary_dim, is_neox), _rotate(k, cos, sin, rotary_dim, is_neox)


@register("rope_store_kv", backend="torch", priority=0)
def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin: torch.Tensor, rotary_dim: int, is_neox: bool,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  k_scale: float = 1.0, v_scale: float = 1.0,
                  v_norm_weight: torch.Tensor | None = None, v_norm_eps: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """rope(q, k) then store_kv(rotated k, v, k_scale, v_scale); returns the rotated (q, k).
    v_norm_weight [Dv]: v is stored as rms_norm(v, v_norm_weight, v_norm_eps) over its last
    dim (MLA's normed latent, which only the cache keeps)."""
    q2, k2 = rope(q, k, positions, cos_sin, rotary_dim, is_neox)
    if v_norm_weight is not None:
        v = rms_norm(v.reshape(-1, v.shape[-1]), v_norm_weight, v_norm_eps).view(v.shape)
    store_kv(k2, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q2, k2
