"""The MXFP4 format (OCP microscaling FP4), in which GPT-OSS's experts are released.

A weight W[..., out, in] is two uint8 tensors: `blocks [..., out, in / 32, 16]`, two FP4 E2M1
codes a byte (the low nibble is the even element, the high nibble the odd one), and
`scales [..., out, in / 32]`, one power-of-two scale per 32 elements in E8M0
(2^(s - 127)). `dequantize` is the plain-torch decoding; the `fused_moe_mxfp4` op's kernels
decode tiles in registers instead.
"""
from __future__ import annotations

import torch

# FP4 E2M1 code -> value (sign bit 3, two exponent bits, one mantissa bit)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32          # elements per scale
BLOCK_BYTES = BLOCK // 2
SCALE_BIAS = 127    # E8M0 exponent bias


def dequantize(blocks: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G * 32] in `dtype` (exact:
    an FP4 value times a power of two fits bfloat16 unless the scale leaves its range)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK_BYTES:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} "
                         f"do not match ([..., G, {BLOCK_BYTES}] and [..., G])")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = blocks.to(torch.int64)
    pairs = torch.stack([lut[codes & 0x0F], lut[codes >> 4]], dim=-1)         # [..., G, 16, 2]
    values = pairs.reshape(*scales.shape, BLOCK)                              # [..., G, 32]
    exp = scales.to(torch.int32)[..., None] - SCALE_BIAS                      # [..., G, 1]
    return torch.ldexp(values, exp).reshape(*scales.shape[:-1], -1).to(dtype)
