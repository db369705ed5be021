"""Collectives over named groups: a thin wrapper of torch.distributed.

gloo on CPU, NCCL on GPU (whatever backend the caller initialised torch.distributed with).
A group of one rank, or a process that never initialised torch.distributed, gets no-op
collectives, so single-rank code paths run unchanged. Only the compiler's installed steps
and the runner call these; model files never do.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from appliance.model.placement import ParallelLayout


class Group:
    """One communicator: this rank's group of `ranks` (global ranks)."""

    def __init__(self, ranks: tuple[int, ...], rank: int, pg: object | None) -> None:
        self.ranks = ranks
        self.size = len(ranks)
        self.rank = ranks.index(rank)
        self.pg = pg  # torch ProcessGroup, or None for a group of one

    def __repr__(self) -> str:
        return f"Group(ranks={self.ranks})"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group (in place; returns x)."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.pg)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x: this rank's shard -> the shards of all ranks concatenated along `dim`."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.pg)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x: full-shaped partial sums -> this rank's slice of the sum along `dim`.

        gloo has no reduce_scatter: it is an all-reduce followed by a local slice there."""
        if self.size == 1:
            return x
        if x.shape[dim] % self.size:
            raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} does not split "
                             f"over {self.size} ranks")
        if dist.get_backend(self.pg) == "nccl":
            parts = [p.contiguous() for p in x.chunk(self.size, dim=dim)]
            out = torch.empty_like(parts[0])
            dist.reduce_scatter(out, parts, op=dist.ReduceOp.SUM, group=self.pg)
            return out
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.pg)
        return x.chunk(self.size, dim=dim)[self.rank].contiguous()

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Replicate -> Shard: keep this rank's slice (no communication)."""
        if self.size == 1:
            return x
        return x.chunk(self.size, dim=dim)[self.rank].contiguous()

    def min_int(self, value: int) -> int:
        """The minimum of an int over the group (e.g. so all ranks agree on num_pages)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64,
                         device="cuda" if dist.get_backend(self.pg) == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.pg)
        return int(t.item())


class World:
    """The communicators of a ParallelLayout: one Group per named group."""

    def __init__(self, layout: ParallelLayout) -> None:
        self.layout = layout
        if layout.world_size > 1 and not dist.is_initialized():
            raise RuntimeError(f"tp_size={layout.world_size} needs torch.distributed initialised "
                               "(gloo on CPU, nccl on GPU) before the model is built")
        if dist.is_initialized() and dist.get_world_size() != layout.world_size:
            raise RuntimeError(f"torch.distributed world size {dist.get_world_size()} != "
                               f"tp_size {layout.world_size}")
        self._groups: dict[str, Group] = {}
        by_ranks: dict[tuple[int, ...], object | None] = {}
        if layout.world_size > 1:
            by_ranks[tuple(range(layout.world_size))] = dist.group.WORLD
            # dist.new_group must be entered by every rank in the same order, members or not:
            # build the groups of every rank's layout, in a fixed order.
            for name, _ in layout.groups:
                for other in range(layout.world_size):
                    peer = ParallelLayout.tensor_parallel(
                        other, layout.world_size, len(layout.ranks("moe_ep")))
                    ranks = peer.ranks(name)
                    if len(ranks) > 1 and ranks not in by_ranks:
                        by_ranks[ranks] = dist.new_group(list(ranks))
        for name, ranks in layout.groups:
            self._groups[name] = Group(ranks, layout.rank, by_ranks.get(ranks))

    @staticmethod
    def single() -> "World":
        return World(ParallelLayout.single())

    def group(self, name: str) -> Group:
        try:
            return self._groups[name]
        except KeyError:
            raise KeyError(f"unknown parallel group {name!r}; known: {sorted(self._groups)}")

    def min_int(self, value: int) -> int:
        """Minimum over all ranks of the world."""
        if self.layout.world_size == 1:
            return value
        return Group(tuple(range(self.layout.world_size)), self.layout.rank,
                     dist.group.WORLD).min_int(value)
