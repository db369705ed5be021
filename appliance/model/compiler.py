"""The placement compiler: collectives between neighbouring modules, and the weight shard plan.

At model construction `compile_model` walks the model's hidden-state chain (the `Placed`
modules in the order `forward` runs them, from `model.placement_chain()`), and for each
boundary producer -> consumer decides the step that turns the producer's output placement
into the consumer's input placement:

    Partial   -> Replicate   all_reduce          (fused into a following RMSNorm when it can)
    Partial   -> Shard(d)    reduce_scatter(d)
    Shard(d)  -> Replicate   all_gather(d)
    Replicate -> Shard(d)    split(d)            (local slice, no communication)
    equal placements         none

The result is installed on the modules (a forward hook on the producer, or the fused
all-reduce + residual add + RMSNorm step on the consumer), so model files never call a
collective. The same walk resolves every parameter's `WeightSharding` into the loader's
`ShardPlan` (with the checkpoint names a model's `checkpoint_prefixes` gives).
`plan_collectives` is pure (placements in, steps out) and unit-tested alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from appliance.model.comm import Group, World
from appliance.model.placement import (LoadSlice, ParallelLayout, Partial, Placed, Placement,
                                       Replicate, Shard, ShardPlan, WeightSharding, normalize,
                                       resolve_sharding)


class PlacementError(ValueError):
    """Two neighbouring placements that no collective can reconcile, or a bad declaration."""


@dataclass(frozen=True)
class ChainNode:
    """One module of the hidden-state chain, as the compiler sees it."""

    name: str
    input: Placement | None  # None: a source (takes token ids)
    output: Placement | None  # None: a sink (the model's result)
    fuses_input_reduce: bool = False


@dataclass(frozen=True)
class Step:
    """What runs between `producer` and `consumer`. op is one of: none, split, all_reduce,
    all_gather, reduce_scatter, fused_all_reduce_add_rms_norm."""

    producer: str
    consumer: str
    op: str
    group: str
    dim: int | None = None

    def __str__(self) -> str:
        dim = "" if self.dim is None else f", dim={self.dim}"
        return f"{self.producer} -> {self.consumer}: {self.op}({self.group}{dim})"


def _same_group(a: str, b: str, layout: ParallelLayout) -> bool:
    return a == b or layout.ranks(a) == layout.ranks(b)


def reconcile(src: Placement, dst: Placement, layout: ParallelLayout, where: str) -> tuple[str, str, int | None]:
    """(op, group, dim) turning `src` into `dst`; PlacementError when impossible."""
    src, dst = normalize(src, layout), normalize(dst, layout)
    if not _same_group(src.group, dst.group, layout):
        src_ranks, dst_ranks = layout.ranks(src.group), layout.ranks(dst.group)
        # Replicated over a superset of the target group: the target is a local view.
        if isinstance(src, Replicate) and set(dst_ranks) <= set(src_ranks):
            if isinstance(dst, Replicate):
                return "none", dst.group, None
            if isinstance(dst, Shard):
                return "split", dst.group, dst.dim
        raise PlacementError(
            f"{where}: cannot reconcile {src} (ranks {list(src_ranks)}) with {dst} "
            f"(ranks {list(dst_ranks)}): the groups differ; only a tensor replicated over a "
            f"superset of the consumer's group can change group")
    g = src.group
    if isinstance(src, Replicate):
        if isinstance(dst, Replicate):
            return "none", g, None
        if isinstance(dst, Shard):
            return "split", g, dst.dim
        raise PlacementError(f"{where}: {src} -> {dst} would need zeroing all but one rank; "
                             "no module should declare a Partial input")
    if isinstance(src, Partial):
        if isinstance(dst, Replicate):
            return "all_reduce", g, None
        if isinstance(dst, Shard):
            return "reduce_scatter", g, dst.dim
        return "none", g, None
    # src is Shard
    if isinstance(dst, Replicate):
        return "all_gather", g, src.dim
    if isinstance(dst, Shard):
        if dst.dim == src.dim:
            return "none", g, None
        raise PlacementError(f"{where}: {src} -> {dst} needs an all-to-all, which the "
                             "compiler does not insert; gather first (declare Replicate)")
    raise PlacementError(f"{where}: {src} -> {dst}: a sharded tensor cannot become a pending "
                         "sum; declare the consumer's input Shard or Replicate")


def plan_collectives(chain: Sequence[ChainNode], layout: ParallelLayout) -> list[Step]:
    """The step of every boundary of `chain` (one Step per neighbouring pair).

    A Partial -> Replicate all-reduce whose consumer `fuses_input_reduce` (an RMSNorm, with
    or without residual) becomes one fused_all_reduce_add_rms_norm step."""
    if not chain:
        raise PlacementError("empty placement chain")
    if chain[0].input is not None:
        raise PlacementError(f"{chain[0].name}: the chain must start at a source "
                             f"(input None), not {chain[0].input}")
    steps: list[Step] = []
    for prod, cons in zip(chain, chain[1:]):
        where = f"{prod.name} -> {cons.name}"
        if prod.output is None:
            raise PlacementError(f"{where}: {prod.name} is a sink (output None) but is followed "
                                 f"by {cons.name}")
        if cons.input is None:
            raise PlacementError(f"{where}: {cons.name} takes no hidden-state input (a source) "
                                 "but follows another module")
        op, group, dim = reconcile(prod.output, cons.input, layout, where)
        if op == "all_reduce" and cons.fuses_input_reduce:
            op = "fused_all_reduce_add_rms_norm"
        steps.append(Step(prod.name, cons.name, op, group, dim))
    if chain[-1].output is not None:
        raise PlacementError(f"{chain[-1].name}: the chain must end at a sink (output None)")
    return steps


# --------------------------------------------------------------------------- installed steps
class OutputStep:
    """A collective applied to a producer's output (installed as a forward hook)."""

    def __init__(self, op: str, group: Group, dim: int | None) -> None:
        self.op, self.group, self.dim = op, group, dim
        fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "all_reduce": group.all_reduce,
            "all_gather": lambda x: group.all_gather(x, dim),
            "reduce_scatter": lambda x: group.reduce_scatter(x, dim),
            "split": lambda x: group.split(x, dim),
        }
        self.fn = fns[op]

    def __call__(self, module: nn.Module, args: tuple, output):
        # output: a tensor, or a tuple whose first element is the hidden state
        if isinstance(output, tuple):
            return (self.fn(output[0]), *output[1:])
        return self.fn(output)


class FusedAllReduceAddRMSNorm:
    """all_reduce(x), then (+ residual) and RMSNorm, as one step owned by the compiler.

    Today it is the all-reduce followed by the fused_add_rms_norm kernel; a kernel fusing
    the communication too plugs in here without touching any model file."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, rms_norm: Callable, fused_add_rms_norm: Callable
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, H] partial sums; residual: [T, H] or None -> (normed [T, H], new residual [T, H])
        x = self.group.all_reduce(x)
        if residual is None:
            return rms_norm(x, weight, eps), x
        return fused_add_rms_norm(x, residual, weight, eps)


@dataclass
class CompiledModel:
    steps: list[Step]
    shard_plan: ShardPlan

    def collectives(self) -> list[Step]:
        return [s for s in self.steps if s.op != "none"]


def chain_nodes(model: nn.Module, chain: Sequence[tuple[str, nn.Module]] | None = None
                ) -> tuple[list[ChainNode], dict[str, Placed]]:
    """The model's chain (or `chain`, one of its side chains) as ChainNodes, with the final
    sink "logits" requiring Replicate."""
    chain = list(model.placement_chain() if chain is None else chain)
    nodes: list[ChainNode] = []
    mods: dict[str, Placed] = {}
    for name, mod in chain:
        if not isinstance(mod, Placed):
            raise PlacementError(f"{name}: {type(mod).__name__} is on the placement chain but "
                                 "is not a Placed module (declare input/output placements)")
        nodes.append(ChainNode(name, mod.input_placement, mod.output_placement,
                               mod.fuses_input_reduce))
        mods[name] = mod
    last_group = nodes[-1].output.group if nodes and nodes[-1].output is not None else "attn_tp"
    nodes.append(ChainNode("logits", Replicate(last_group), None))
    return nodes, mods


def install(steps: Sequence[Step], mods: dict[str, Placed], world: World) -> None:
    """Put each step on its modules: a forward hook on the producer, or a fused norm step."""
    for step in steps:
        if step.op == "none":
            continue
        group = world.group(step.group)
        if step.op == "fused_all_reduce_add_rms_norm":
            mods[step.consumer].set_fused_reduce(FusedAllReduceAddRMSNorm(group))
        else:
            mods[step.producer].register_forward_hook(OutputStep(step.op, group, step.dim))


def checkpoint_named(ws: WeightSharding, prefixes: dict[str, str]) -> WeightSharding:
    """`ws` with its sources renamed by the model's `checkpoint_prefixes` (module path prefix
    -> checkpoint name prefix), for modules stored elsewhere in the checkpoint than in the
    model (GLM's MTP layers: `mtp_layers.0.` -> `model.layers.46.`)."""
    def rename(name: str) -> str:
        for ours, theirs in prefixes.items():
            if name.startswith(ours):
                return theirs + name[len(ours):]
        return name
    sources = tuple(dataclasses.replace(s, name=rename(s.name)) for s in ws.sources)
    return dataclasses.replace(ws, sources=sources)


def plan_weights(model: nn.Module, layout: ParallelLayout) -> ShardPlan:
    """Every parameter's WeightSharding resolved for this rank, checked for coverage."""
    plan = ShardPlan()
    params = dict(model.named_parameters())
    prefixes: dict[str, str] = getattr(model, "checkpoint_prefixes", {})
    covered: dict[str, int] = {name: 0 for name in params}
    padded: set[str] = set()
    for prefix, mod in model.named_modules():
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        declare = getattr(mod, "weight_shardings", None)
        if declare is None:
            if own:
                raise PlacementError(f"{prefix or type(model).__name__}: owns parameters {own} but "
                                     "declares no weight_shardings()")
            continue
        for ws in declare(prefix):
            ws = checkpoint_named(ws, prefixes)
            if ws.param not in params:
                raise PlacementError(f"{prefix}: weight sharding names unknown parameter "
                                     f"{ws.param!r}")
            if ws.style == "vocab":
                padded.add(ws.param)
            target = params[ws.param]
            for sl in resolve_sharding(ws, layout):
                covered[ws.param] += _check_slice(sl, target)
                plan.add(sl)
    for name, p in params.items():
        n = covered[name]
        if n == 0 or (n != p.numel() and name not in padded) or n > p.numel():
            raise PlacementError(f"parameter {name} {tuple(p.shape)}: its weight shardings cover "
                                 f"{n} of {p.numel()} elements")
    return plan


def _check_slice(sl: LoadSlice, param: torch.Tensor) -> int:
    """Elements of `param` this slice writes; PlacementError if the shapes disagree."""
    shape = tuple(param.shape[len(sl.index):])
    if len(shape) != len(sl.shape):
        raise PlacementError(f"{sl.name} {sl.shape} -> {sl.param} {tuple(param.shape)}: rank differs")
    for d, (want, have) in enumerate(zip(sl.shape, shape)):
        if d == sl.src_dim:
            if sl.dst_start + sl.length > have:
                raise PlacementError(f"{sl.name} -> {sl.param}: dim {d} slice "
                                     f"[{sl.dst_start}, {sl.dst_start + sl.length}) exceeds {have}")
        elif want != have:
            raise PlacementError(f"{sl.name} {sl.shape} -> {sl.param} {tuple(param.shape)}: "
                                 f"dim {d} differs")
    n = 1
    for d, s in enumerate(sl.shape):
        n *= sl.length if d == sl.src_dim else s
    return n


def compile_model(model: nn.Module, layout: ParallelLayout, world: World) -> CompiledModel:
    """Plan and install the collectives of `model` (its chain, then its `side_chains()`: the
    modules it runs beside the main chain, e.g. MTP layers, which start at a module the main
    chain already has), and plan its weight shards."""
    steps: list[Step] = []
    side_chains = getattr(model, "side_chains", lambda: ())
    for chain in (None, *side_chains()):
        nodes, mods = chain_nodes(model, chain)
        chain_steps = plan_collectives(nodes, layout)
        install(chain_steps, mods, world)
        steps += chain_steps
    return CompiledModel(steps, plan_weights(model, layout))
