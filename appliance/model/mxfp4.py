"""MXFP4 checkpoint tensors (GPT-OSS's released experts), dequantized at load.

A checkpoint stores W[..., out, in] as `<name>_blocks` uint8 [..., out, in / 32, 16] and
`<name>_scales` uint8 [..., out, in / 32] (the format: kernels/mxfp4.py). HF names the
dequantized tensor `<name>` and lays it out transposed, [..., in, out] (GptOssExperts'
`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]), so a packed pair reads here as exactly the
tensor a bf16 checkpoint of the same model holds: the loader (`loader.load_checkpoint`) serves
it through `PackedView`, which has the parts of safetensors' slice API the loader uses, one
expert at a time.
"""
from __future__ import annotations

import torch

from kernels.mxfp4 import BLOCK, BLOCK_BYTES, dequantize

BLOCKS, SCALES = "_blocks", "_scales"


def packed_names(name: str) -> tuple[str, str]:
    return name + BLOCKS, name + SCALES


class PackedView:
    """A packed pair seen as HF's dequantized tensor [E, in, out] (bf16): the safetensors slice
    API the loader uses (`get_dtype`, `get_shape`, `[index]`), read one leading index (expert)
    at a time so that no more than one expert is ever dequantized at once."""

    def __init__(self, blocks, scales, name: str) -> None:   # safetensors slice objects
        self.blocks, self.scales, self.name = blocks, scales, name
        b, s = tuple(blocks.get_shape()), tuple(scales.get_shape())
        if len(b) != 4 or b[:-1] != s or b[-1] != BLOCK_BYTES:
            raise ValueError(f"{name}: MXFP4 {name}{BLOCKS} {b} and {name}{SCALES} {s} are not "
                             f"[E, out, G, {BLOCK_BYTES}] and [E, out, G]")
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
