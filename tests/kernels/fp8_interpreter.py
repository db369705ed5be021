"""Triton's CPU interpreter rounds float -> float8e4nv wrongly: a mantissa that rounds up past
111 loses its carry when the exponent is odd (31.1 becomes 16, not 32), and ties go up, not to
even. GPUs convert with `cvt.rn.satfinite` (round to nearest even). `exact_fp8_rounding()`
makes the interpreter's conversion to e4m3 torch's (also nearest even) for the duration, so the
interpreted kernels write what a GPU writes; every other conversion stays the interpreter's."""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def exact_fp8_rounding() -> Iterator[None]:
    from triton import language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    sources = {tl.float32: (np.uint32, torch.float32), tl.float16: (np.uint16, torch.float16),
               tl.bfloat16: (np.uint16, torch.bfloat16)}

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if (output_dtype != tl.float8e4nv or input_dtype not in sources
                or rounding_mode not in (None, interpreter._ir.ROUNDING_MODE.RTNE)):
            return original(data, input_dtype, output_dtype, rounding_mode)
        bits, dtype = sources[input_dtype]
        src = torch.from_numpy(np.ascontiguousarray(data).view(bits).copy()).view(dtype)
        return src.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(data.shape)

    interpreter._convert_float = convert
    try:
        yield
    finally:
        interpreter._convert_float = original
