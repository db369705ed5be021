"""Helpers shared by the Triton kernels: support predicates, launch sizing."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_cuda(f: Mapping[str, Any]) -> bool:
    """The registry predicate shared by every Triton op: CUDA and a float dtype."""
    return f.get("device") == "cuda" and f.get("dtype") in FLOAT_DTYPES


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def check(cond: bool, msg: str) -> None:
    """Validate input with an error, not an assert."""
    if not cond:
        raise ValueError(msg)
