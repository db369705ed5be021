"""Q8_0 / Q4_0 / Q4_1 dequantized by torch (appliance/model/gguf_blocks.py) against gguf.quants,
the gguf package's own numpy reading of its formats: bit-identical values, any row layout."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from appliance.model import gguf_files
from appliance.model.gguf_blocks import dequantize_blocks


def _random_blocks(rng: np.random.Generator, qtype, rows: int, blocks_a_row: int) -> np.ndarray:
    """Bytes of rows x blocks_a_row blocks: finite f16 scales and minima of both signs and
    magnitudes (subnormals to large), random quants."""
    size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows, blocks_a_row, size), dtype=np.uint8)
    halves = 2 if qtype == gguf_files.Q.Q4_1 else 1
    scales = (rng.standard_normal((rows, blocks_a_row, halves))
              * 10.0 ** rng.integers(-7, 4, (rows, blocks_a_row, halves))).astype(np.float16)
    raw[..., : 2 * halves] = scales.view(np.uint8).reshape(rows, blocks_a_row, 2 * halves)
    return raw.reshape(rows, blocks_a_row * size)


@pytest.mark.parametrize("qtype", gguf_files.TORCH_DEQUANTIZED)
def test_bit_identical_to_gguf_quants(qtype):
    rng = np.random.default_rng(int(qtype))
    for rows, blocks in ((1, 1), (3, 5), (64, 18)):
        data = _random_blocks(rng, qtype, rows, blocks)
        want = np.asarray(dequantize(data, qtype), dtype=np.float32)
        got = dequantize_blocks(data, qtype)
        assert got.dtype == np.float32 and got.shape == want.shape == (rows, blocks * 32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # a real quantization round trip, through gguf_files' entry (rows of a read-only view)
    values = rng.standard_normal((8, 256)).astype(np.float32)
    packed = quantize(values, qtype)
    packed.setflags(write=False)
    assert np.array_equal(gguf_files.dequantize_array(packed[2:5], qtype),
                          np.asarray(dequantize(packed[2:5], qtype), dtype=np.float32))


def test_the_torch_path_serves_exactly_its_types():
    data = np.zeros((2, GGML_QUANT_SIZES[gguf_files.Q.Q5_0][1]), np.uint8)
    with pytest.raises(ValueError, match="Q5_0 blocks are gguf.quants'"):
        dequantize_blocks(data, gguf_files.Q.Q5_0)
