"""Per-step memo: work every layer of a step repeats on the same batch tensors, done once.

Every layer of a forward pass is handed the same batch tensors (positions, seq_lens,
page_table, slot_mapping, query_start) and derives the same things from them (rope's cos/sin
rows, a decode row's cache slots, an extend kernel's block map). `memoized` keeps such a result
on the first of its input tensors, so it is freed with the step's batch:

    cos, sin = memoized("rope_cos_sin", (positions, cos_sin), lambda: gather(...))

The value must not hold the anchor (a view of it, say): that too would be a cycle.

A kept result is reused only while every input is the same object and unwritten since: torch
counts in-place writes on a normal tensor; an inference tensor (the model runner's) has no
such count, and the engine builds fresh batch tensors every step and never writes one a kernel
has read. Under CUDA-graph capture the first layer's computation is captured and the later
layers read its output tensor, which every replay rewrites: the capture's batch views are
fresh objects (appliance/model/cuda_graph.py), so nothing computed before the capture is kept.
"""
from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch

T = TypeVar("T")
_ATTR = "_ts_step_memo"


def _writes(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def memoized(key: Hashable, inputs: tuple[torch.Tensor, ...], compute: Callable[[], T]) -> T:
    """compute(), or what it returned for the same `key` and the same unwritten `inputs`."""
    anchor = inputs[0]
    memo: dict = anchor.__dict__.setdefault(_ATTR, {})
    others, writes = inputs[1:], tuple(_writes(t) for t in inputs)
    kept = memo.get(key)
    # `kept` holds the other inputs (not the anchor: a cycle would outlive the step), so none
    # of them can be freed and its id reused while it is kept.
    if (kept is not None and kept[1] == writes
            and all(a is b for a, b in zip(kept[0], others))):
        return kept[2]
    value = compute()
    memo[key] = (others, writes, value)
    return value
