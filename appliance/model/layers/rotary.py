"""Rotary position embedding: the cos|sin table, with HF's rope scaling variants.

`rope_config(hf)` reads both spellings of an HF config: transformers v5's `rope_parameters`
({"rope_type", "rope_theta", ...}) and v4's `rope_theta` + `rope_scaling`. Supported
rope types: default, linear, llama3 (Llama-3.1); yarn lives in layers/yarn.py. Others raise a
ValueError naming them.
The table is float32 [max_positions, rotary_dim]: cos in the first half, sin in the second
(the `rope` kernel's layout), built by `init_buffers` once the module is on its device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import kernels


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0


def rope_params(hf: dict) -> dict:
    """transformers v5 `rope_parameters` over v4 `rope_scaling`, with `rope_theta` filled in."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def rope_config(hf: dict) -> RopeConfig:
    """The RoPE settings of an HF config dict (v4 or v5 layout)."""
    params = rope_params(hf)
    theta = params["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_type {rope_type!r} is not supported by layers/rotary.py "
                         "(default, linear, llama3; yarn: layers/yarn.py)")
    return RopeConfig(
        theta=float(theta), rope_type=rope_type, factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))),
        partial_rotary_factor=float(params.get("partial_rotary_factor",
                                               hf.get("partial_rotary_factor", 1.0))))


def inv_frequencies(cfg: RopeConfig, rotary_dim: int) -> torch.Tensor:
    """[R/2] float32 inverse frequencies, scaled per cfg.rope_type."""
    inv = 1.0 / (cfg.theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float()
                               / rotary_dim))                                    # [R/2]
    if cfg.rope_type == "linear":
        return inv / cfg.factor
    if cfg.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        old = cfg.original_max_position_embeddings
        low_wavelen = old / cfg.low_freq_factor
        high_wavelen = old / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv                                              # [R/2]
        scaled = torch.where(wavelen > low_wavelen, inv / cfg.factor, inv)
        smooth = (old / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor
                                                          - cfg.low_freq_factor)
        blended = (1 - smooth) * scaled / cfg.factor + smooth * scaled
        middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(middle, blended, scaled)
    return inv


class RotaryEmbedding(nn.Module):
    """Rotates q and k in place of position: (q, k) = rope(q, k, positions)."""

    def __init__(self, head_dim: int, max_positions: int, cfg: RopeConfig,
                 device: torch.device | str, dtype: torch.dtype, is_neox: bool = True) -> None:
        super().__init__()
        self.cfg, self.max_positions, self.is_neox = cfg, max_positions, is_neox
        self.rotary_dim = int(head_dim * cfg.partial_rotary_factor)
        self.cos_sin: torch.Tensor | None = None
        self.rope = kernels.select("rope", device=device, dtype=dtype)

    def init_buffers(self, device: torch.device) -> None:
        inv = inv_frequencies(self.cfg, self.rotary_dim).to(device)              # [R/2]
        pos = torch.arange(self.max_positions, device=device, dtype=torch.int64).float()
        freqs = torch.outer(pos, inv)                                            # [P, R/2]
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)             # [P, R]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, Hq, D]; k: [T, Hk, D] -> rotated (q, k)
        return self.rope(q, k, positions, self.cos_sin, self.rotary_dim, self.is_neox)
