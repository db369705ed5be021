"""The simple GGUF block formats (Q8_0, Q4_0, Q4_1: 32 values a block, an f16 scale, Q4_1 an f16
minimum) dequantized with torch, every block of a tensor at once, where gguf.quants' numpy goes
through row groups in one thread. The arithmetic is gguf.quants' own, in float32: the scale
times the quant, then plus the minimum, each rounded (two ops, no fused multiply-add), so the
values are bit-identical (tests/model/test_gguf_blocks.py). The other formats stay with
gguf.quants (gguf_files.dequantize_array, which imports this module only for these types: the
frontend, which reads GGUF metadata, imports no torch).

Why: the default CPU model (SmolLM2-135M, Q4_1 with a Q8_0 embedding) spent 0.83 s of its
4.3 s start-up dequantizing on the 2-core box.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from appliance.model.gguf_files import TORCH_DEQUANTIZED

Q = GGMLQuantizationType


def dequantize_blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """data: a tensor's bytes, uint8 [..., B] (B a whole number of blocks) of a type in
    gguf_files.TORCH_DEQUANTIZED -> float32 [..., B / block bytes * block values], a new
    array."""
    if qtype not in TORCH_DEQUANTIZED:
        raise ValueError(f"{qtype.name} blocks are gguf.quants' to dequantize")
    values_a_block, size = GGML_QUANT_SIZES[qtype]
    with warnings.catch_warnings():   # a read-only view of the mapped file: only read here
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8))
    blocks = raw.reshape(-1, size)                                        # [N, size]
    scale = _f16(blocks[:, 0:2])                                          # [N, 1]
    if qtype == Q.Q8_0:
        values = scale * blocks[:, 2:].contiguous().view(torch.int8).float()
    elif qtype == Q.Q4_0:
        values = scale * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float()
    else:  # Q4_1
        values = scale * _nibbles(blocks[:, 4:]).float() + _f16(blocks[:, 2:4])
    return values.reshape(*data.shape[:-1], data.shape[-1] // size * values_a_block).numpy()


def _f16(two_bytes: torch.Tensor) -> torch.Tensor:
    """[N, 2] uint8 -> [N, 1] float32 (the little-endian f16 they hold)."""
    return two_bytes.contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[N, 16] uint8 -> [N, 32]: the low nibbles (values 0-15), then the high ones (16-31)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)
