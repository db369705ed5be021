"""Host -> device copies that do not stall the engine loop."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous host -> device copy. From pageable memory a CUDA copy waits for the
    stream's earlier work (the step in flight), from pinned memory it does not; the caching
    host allocator keeps the pinned buffer alive until the copy is done."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
