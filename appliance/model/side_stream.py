"""Two launches side by side: the first on a side stream, the second on the current stream.

A mixed step's attention is two launches over different rows: the decode rows' (GQA decode)
and the prefill chunk's (extend). One after the other, the chunk's few programs (a 96-token
chunk of Llama-3.1-8B: 48) run a long chain of key tiles on a nearly idle GPU; side by side
they fill the SMs the decode launch leaves. `side_by_side` forks the side stream from the
current one, runs the first launch there and the second here, and joins: later work on the
current stream waits for both. Inside CUDA-graph capture the fork and join become the graph's
edges (two branches), so a replay runs them side by side too.

Each thread has its own side stream per device (start-up's compile threads and the engine's
loop never share one, so no capture sees another thread's launches on it). Off CUDA the two
run one after the other.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

A = TypeVar("A")
B = TypeVar("B")

_streams = threading.local()


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's side stream on `device` (made on first use)."""
    streams = _streams.__dict__.setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def side_by_side(first: Callable[[], A], second: Callable[[], B],
                 device: torch.device) -> tuple[A, B]:
    """(first(), second()): on CUDA first() on the side stream beside second() on the current
    one, both done before anything later on the current stream; elsewhere in turn."""
    if device.type != "cuda":
        return first(), second()
    main = torch.cuda.current_stream(device)
    side = side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        a = first()
    b = second()
    main.wait_stream(side)
    return a, b
