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


def to_device_packed(hosts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Several small host tensors of mixed dtypes -> device tensors of the same dtypes and
    shapes through one copy (one pinned buffer, one launch) instead of one per tensor."""
    if device.type != "cuda":
        return list(hosts)
    return unpack(to_device(pack(hosts), device), hosts)


def pack(hosts: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes in one uint8 buffer, widest element first, so that every tensor's
    bytes start aligned to its element size."""
    return torch.cat([_flat(hosts[i]).view(torch.uint8) for i in _widest_first(hosts)])


def _flat(host: torch.Tensor) -> torch.Tensor:
    """`host` as one dense row: a one-element view of a strided array (numpy's column of one
    row) counts as contiguous whatever its stride, which a byte view refuses."""
    flat = host.contiguous().reshape(-1)
    if flat.numel() == 1 and flat.stride(0) != 1:
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat


def unpack(packed: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `packed` (from pack(like), on any device) with like's dtypes and shapes."""
    order = _widest_first(like)
    parts = packed.split([like[i].numel() * like[i].element_size() for i in order])
    out: list[torch.Tensor] = list(like)
    for i, part in zip(order, parts):
        out[i] = part.view(like[i].dtype).view(like[i].shape)
    return out


def _widest_first(hosts: list[torch.Tensor]) -> list[int]:
    return sorted(range(len(hosts)), key=lambda i: -hosts[i].element_size())
