"""Placements: how a tensor is laid out over a named group of ranks, and how weights shard.

A tensor's *placement* over a group says what each rank of the group holds:

- `Replicate(group)`: every rank holds the whole tensor, identical on all ranks.
- `Shard(dim, group)`: rank i holds the i-th slice of the tensor along `dim`.
- `Partial(group)`: every rank holds a full-shaped tensor; the true value is their sum.

Groups are named, so that attention, dense MLPs and MoE layers can use different parallel
layouts over the same ranks: "attn_tp", "dense_tp", "moe_tp", "moe_ep". A `ParallelLayout`
maps each name to the ranks of this rank's group. Over a group of size 1 every placement is
`Replicate`.

Modules whose input and output travel along the hidden-state chain derive from `Placed` and
set `input_placement` / `output_placement`; the compiler (`compiler.py`) reconciles
neighbours. Modules that own parameters describe how each parameter is cut from checkpoint
tensors with `WeightSharding` (column / row / replicated / vocab, with the checkpoint dim);
the compiler resolves those into concrete `LoadSlice`s for this rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union

from torch import nn

GROUPS: tuple[str, ...] = ("attn_tp", "dense_tp", "moe_tp", "moe_ep")


# --------------------------------------------------------------------------- placements
@dataclass(frozen=True)
class Replicate:
    group: str = "attn_tp"

    def __str__(self) -> str:
        return f"Replicate({self.group})"


@dataclass(frozen=True)
class Shard:
    dim: int
    group: str = "attn_tp"

    def __str__(self) -> str:
        return f"Shard(dim={self.dim}, {self.group})"


@dataclass(frozen=True)
class Partial:
    group: str = "attn_tp"

    def __str__(self) -> str:
        return f"Partial({self.group})"


Placement = Union[Replicate, Shard, Partial]


class Placed(nn.Module):
    """A module on the hidden-state chain: declares where its input and output live.

    `input_placement` is what `forward`'s first argument must be; `output_placement` is what
    its (first) result is. The compiler installs whatever collective makes a producer's output
    match the next consumer's input. `fuses_input_reduce` marks a consumer (RMSNorm) that can
    take a pending all-reduce into its own step (`set_fused_reduce`)."""

    input_placement: Placement | None = None  # None: takes token ids, no hidden-state input
    output_placement: Placement = Replicate()
    fuses_input_reduce: bool = False

    def set_fused_reduce(self, step) -> None:  # pragma: no cover - only RMSNorm overrides
        raise TypeError(f"{type(self).__name__} cannot fuse a reduce into its input")


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class ParallelLayout:
    """This rank's view of the parallel groups: group name -> ranks of this rank's group."""

    rank: int
    world_size: int
    groups: tuple[tuple[str, tuple[int, ...]], ...]

    @staticmethod
    def tensor_parallel(rank: int, world_size: int, moe_ep_size: int = 1) -> "ParallelLayout":
        """All of attention / dense / MoE tensor-parallel over the whole world, except that
        `moe_ep_size` > 1 splits the world into expert-parallel groups of that size (ranks
        r, r+T, r+2T, ... with T = world/ep) and MoE tensor-parallel groups of size T."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"tp_rank {rank} is not in [0, tp_size={world_size})")
        if moe_ep_size < 1 or world_size % moe_ep_size:
            raise ValueError(f"moe_ep_size {moe_ep_size} must divide tp_size {world_size}")
        world = tuple(range(world_size))
        t = world_size // moe_ep_size
        moe_tp = tuple(range(rank // t * t, rank // t * t + t))
        moe_ep = tuple(rank % t + k * t for k in range(moe_ep_size))
        return ParallelLayout(rank, world_size, (("attn_tp", world), ("dense_tp", world),
                                                 ("moe_tp", moe_tp), ("moe_ep", moe_ep)))

    @staticmethod
    def single() -> "ParallelLayout":
        return ParallelLayout.tensor_parallel(0, 1)

    def ranks(self, group: str) -> tuple[int, ...]:
        for name, ranks in self.groups:
            if name == group:
                return ranks
        raise KeyError(f"unknown parallel group {group!r}; known: {[n for n, _ in self.groups]}")

    def size(self, group: str) -> int:
        return len(self.ranks(group))

    def rank_in(self, group: str) -> int:
        return self.ranks(group).index(self.rank)


def normalize(p: Placement, layout: ParallelLayout) -> Placement:
    """Over a group of one rank, Shard and Partial are the whole tensor: Replicate."""
    if layout.size(p.group) == 1:
        return Replicate(p.group)
    return p


# --------------------------------------------------------------------------- weight sharding
def split_extent(size: int, unit: int, rank: int, nranks: int, what: str) -> tuple[int, int]:
    """(start, length) of rank's part of `size` elements cut in whole `unit`s.

    With fewer units than ranks (GQA key/value heads below the TP size) each unit is
    replicated over nranks/units consecutive ranks. Raises ValueError naming `what` when
    the sizes do not divide."""
    if size % unit:
        raise ValueError(f"{what}: size {size} is not a multiple of its unit {unit}")
    units = size // unit
    if units >= nranks:
        if units % nranks:
            raise ValueError(f"{what}: {units} units of {unit} cannot be split over {nranks} ranks")
        per = units // nranks
        return rank * per * unit, per * unit
    if nranks % units:
        raise ValueError(f"{what}: {units} units cannot be replicated evenly over {nranks} ranks")
    return (rank * units // nranks) * unit, unit


def vocab_extent(size: int, rank: int, nranks: int) -> tuple[int, int, int]:
    """(start, length, padded_per_rank) of a vocab-parallel table: ceil(V/n) rows per rank;
    the last ranks may hold fewer real rows (the rest is zero padding)."""
    per = math.ceil(size / nranks)
    start = min(rank * per, size)
    return start, min(per, size - start), per


@dataclass(frozen=True)
class WeightSource:
    """One checkpoint tensor feeding (part of) a parameter.

    `name` is the full checkpoint name; `shape` its full checkpoint shape; `unit` the
    granularity of the sharded dim (head_dim for attention heads, 1 otherwise)."""

    name: str
    shape: tuple[int, ...]
    unit: int = 1


Style = Literal["replicated", "column", "row", "vocab"]


@dataclass(frozen=True)
class WeightSharding:
    """How a local parameter is cut from checkpoint tensors.

    - "replicated": each source is copied whole.
    - "column": sharded along checkpoint dim `dim` (0 for a [out, in] linear weight or a bias);
      several sources are concatenated along that dim in the local parameter (fused qkv,
      gate|up).
    - "row": sharded along checkpoint dim `dim` (1 for a [out, in] linear weight).
    - "vocab": rows padded to ceil(V/n) per rank; the missing rows stay zero.
    `index` selects a slot along the parameter's leading dims first (a local expert of a
    stacked [E, ...] parameter); `dim` then refers to the checkpoint tensor and to the
    parameter after indexing, which have the same rank."""

    param: str  # fully qualified parameter name in the model
    style: Style
    group: str
    sources: tuple[WeightSource, ...]
    dim: int = 0
    index: tuple[int, ...] = ()


@dataclass(frozen=True)
class LoadSlice:
    """Copy `checkpoint[name].narrow(src_dim, src_start, length)` into
    `param[index].narrow(src_dim, dst_start, length)` (whole tensor when src_dim is None)."""

    name: str
    shape: tuple[int, ...]  # expected full checkpoint shape
    param: str
    index: tuple[int, ...] = ()
    src_dim: int | None = None
    src_start: int = 0
    dst_start: int = 0
    length: int = 0


@dataclass
class ShardPlan:
    """The loader's plan: for each checkpoint tensor, where its slices go on this rank."""

    slices: dict[str, list[LoadSlice]] = field(default_factory=dict)

    def add(self, s: LoadSlice) -> None:
        self.slices.setdefault(s.name, []).append(s)

    def names(self) -> list[str]:
        return list(self.slices)


def resolve_sharding(ws: WeightSharding, layout: ParallelLayout) -> list[LoadSlice]:
    """The concrete slices of one WeightSharding on this rank."""
    n, r = layout.size(ws.group), layout.rank_in(ws.group)
    out: list[LoadSlice] = []
    dst = 0
    for src in ws.sources:
        if ws.style == "replicated":
            out.append(LoadSlice(src.name, src.shape, ws.param, ws.index))
            continue
        if ws.dim >= len(src.shape):
            raise ValueError(f"{src.name}: shard dim {ws.dim} out of range for shape {src.shape}")
        size = src.shape[ws.dim]
        if ws.style == "vocab":
            start, length, _ = vocab_extent(size, r, n)
        else:
            start, length = split_extent(size, src.unit, r, n, src.name)
        out.append(LoadSlice(src.name, src.shape, ws.param, ws.index, ws.dim, start, dst, length))
        dst += length
    return out


def sharded_size(size: int, unit: int, layout: ParallelLayout, group: str, what: str) -> int:
    """Local length of a dim of `size` split in `unit`s over `group` (see split_extent)."""
    return split_extent(size, unit, layout.rank_in(group), layout.size(group), what)[1]
