"""MXFP4 checkpoint tensors (GPT-OSS's released experts), dequantized at load.

The OCP microscaling FP4 format: a tensor W[..., out, in] is stored as two tensors,
`<name>_blocks` uint8 [..., out, in / 32, 16] (two FP4 E2M1 values a byte: the low nibble is
the even element, the high nibble the odd one) and `<name>_scales` uint8 [..., out, in / 32]
(one power-of-two scale per 32 elements, E8M0: 2^(s - 127)). HF names the dequantized tensor
`<name>` and lays it out transposed, [..., in, out] (GptOssExperts' `gate_up_proj` [E, H, 2I],
`down_proj` [E, I, H]), so a packed pair reads here as exactly the tensor a bf16 checkpoint of
the same model holds: the loader (`loader.load_checkpoint`) serves it through `PackedView`,
which has the parts of safetensors' slice API the loader uses, one expert at a time.
"""
from __future__ import annotations

import torch

# FP4 E2M1 code -> value (sign bit 3, two exponent bits, one mantissa bit)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32          # elements per scale
SCALE_BIAS = 127    # E8M0 exponent bias
BLOCKS, SCALES = "_blocks", "_scales"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G * 32] in `dtype` (exact:
    an FP4 value times a power of two fits bfloat16 unless the scale leaves its range)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} "
                         f"do not match ([..., G, {BLOCK // 2}] and [..., G])")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = blocks.to(torch.int64)
    pairs = torch.stack([lut[codes & 0x0F], lut[codes >> 4]], dim=-1)         # [..., G, 16, 2]
    values = pairs.reshape(*scales.shape, BLOCK)                              # [..., G, 32]
    exp = scales.to(torch.int32)[..., None] - SCALE_BIAS                      # [..., G, 1]
    return torch.ldexp(values, exp).reshape(*scales.shape[:-1], -1).to(dtype)


def packed_names(name: str) -> tuple[str, str]:
    return name + BLOCKS, name + SCALES


class PackedView:
    """A packed pair seen as HF's dequantized tensor [E, in, out] (bf16): the safetensors slice
    API the loader uses (`get_dtype`, `get_shape`, `[index]`), read one leading index (expert)
    at a time so that no more than one expert is ever dequantized at once."""

    def __init__(self, blocks, scales, name: str) -> None:   # safetensors slice objects
        self.blocks, self.scales, self.name = blocks, scales, name
        b, s = tuple(blocks.get_shape()), tuple(scales.get_shape())
        if len(b) != 4 or b[:-1] != s or b[-1] != BLOCK // 2:
            raise ValueError(f"{name}: MXFP4 {name}{BLOCKS} {b} and {name}{SCALES} {s} are not "
                             f"[E, out, G, {BLOCK // 2}] and [E, out, G]")
        if blocks.get_dtype() != "U8" or scales.get_dtype() != "U8":
            raise ValueError(f"{name}: MXFP4 blocks / scales must be uint8, got "
                             f"{blocks.get_dtype()} / {scales.get_dtype()}")
        self.shape = (b[0], b[2] * BLOCK, b[1])                                 # [E, in, out]

    def get_dtype(self) -> str:
        return "BF16"

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        """index: `slice(None)` or a tuple of slices over [E, in, out]."""
        idx = index if isinstance(index, tuple) else (index,)
        idx = idx + (slice(None),) * (3 - len(idx))
        experts = range(*idx[0].indices(self.shape[0]))
        parts = [dequantize(self.blocks[e:e + 1], self.scales[e:e + 1])[0]      # [out, in]
                 .t()[idx[1], idx[2]] for e in experts]
        return torch.stack(parts)                                               # [E', in', out']
