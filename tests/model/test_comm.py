"""comm.py over a real gloo world of 2 ranks, and the compiler's installed output steps
(including reduce_scatter and split, which the Llama chain does not use)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from appliance.model.comm import World
from appliance.model.compiler import ChainNode, install, plan_collectives
from appliance.model.placement import ParallelLayout, Partial, Placed, Replicate, Shard
from helpers import free_port


class _Emit(Placed):
    """A source whose output is `value` scaled by (rank + 1), with a declared placement."""

    input_placement = None

    def __init__(self, out, rank: int) -> None:
        super().__init__()
        self.output_placement, self.rank = out, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.rank + 1)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        layout = ParallelLayout.tensor_parallel(rank, world)
        w = World(layout)
        g = w.group("attn_tp")
        x = torch.arange(8, dtype=torch.float32).view(4, 2)            # [4, 2]
        mine = x * (rank + 1)
        checks = {
            "all_reduce": torch.equal(g.all_reduce(mine.clone()), x * 3),
            "all_gather": torch.equal(g.all_gather(mine, dim=0), torch.cat([x, 2 * x], 0)),
            "reduce_scatter": torch.equal(g.reduce_scatter(mine, dim=0), (3 * x).chunk(2)[rank]),
            "split": torch.equal(g.split(x, dim=1), x[:, rank:rank + 1]),
            "min_int": w.min_int(10 + rank) == 10,
        }
        # installed steps: a producer's output placement reconciled with a sink's input
        for out, want in [(Partial("attn_tp"), x * 3),
                          (Shard(0, "attn_tp"), torch.cat([x, 2 * x], 0)),
                          (Replicate("attn_tp"), x * (rank + 1))]:
            for sink_in, name in [(Replicate("attn_tp"), "rep"), (Shard(0, "attn_tp"), "shard")]:
                if isinstance(out, Replicate) and name == "shard":
                    want_here = (x * (rank + 1)).chunk(2)[rank]
                elif name == "shard" and isinstance(out, Partial):
                    want_here = (3 * x).chunk(2)[rank]
                elif name == "shard":
                    continue  # Shard(0) -> Shard(0): nothing to do
                else:
                    want_here = want
                m = _Emit(out, rank)
                steps = plan_collectives([ChainNode("m", None, out),
                                          ChainNode("sink", sink_in, None)], layout)
                install(steps, {"m": m, "sink": nn.Identity()}, w)
                checks[f"{out}->{name} ({steps[0].op})"] = torch.equal(m(x), want_here)
        Path(out_dir, f"rank{rank}.txt").write_text(
            "\n".join(k for k, ok in checks.items() if not ok))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_collectives_and_installed_steps(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert (tmp_path / f"rank{r}.txt").read_text() == "", f"rank {r} failed these checks"


def test_single_rank_world_is_noop():
    w = World.single()
    g = w.group("moe_ep")
    x = torch.randn(3, 4)
    assert g.all_reduce(x) is x and g.all_gather(x, 0) is x and g.reduce_scatter(x, 0) is x
    assert w.min_int(7) == 7
