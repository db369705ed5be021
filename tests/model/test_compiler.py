"""The placement compiler alone: placements in, collective plan out (no processes needed)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from appliance.model.compiler import (ChainNode, PlacementError, chain_nodes, plan_collectives,
                                      plan_weights)
from appliance.model.context import BuildContext
from appliance.model.models.llama import LlamaForCausalLM
from appliance.model.placement import ParallelLayout, Partial, Placed, Replicate, Shard
from helpers import tiny_hf_config


def _llama(world: int, rank: int = 0, **over) -> LlamaForCausalLM:
    cfg = tiny_hf_config("llama", **over).to_dict()
    ctx = BuildContext(ParallelLayout.tensor_parallel(rank, world), torch.device("cpu"),
                       torch.float32, 16)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg, ctx)


def _plan(world: int, **over) -> list[str]:
    layout = ParallelLayout.tensor_parallel(0, world)
    nodes, _ = chain_nodes(_llama(world, **over))
    return [str(s) for s in plan_collectives(nodes, layout) if s.op != "none"]


def test_llama_tp4_plan():
    fused = "fused_all_reduce_add_rms_norm(attn_tp)"
    assert _plan(4) == [
        f"model.embed_tokens -> model.layers.0.input_layernorm: {fused}",
        f"model.layers.0.self_attn -> model.layers.0.post_attention_layernorm: {fused}",
        "model.layers.0.mlp -> model.layers.1.input_layernorm: "
        "fused_all_reduce_add_rms_norm(dense_tp)",
        f"model.layers.1.self_attn -> model.layers.1.post_attention_layernorm: {fused}",
        "model.layers.1.mlp -> model.norm: fused_all_reduce_add_rms_norm(dense_tp)",
        "lm_head -> logits: all_gather(attn_tp, dim=-1)",
    ]


def test_tp1_plan_has_no_collectives():
    assert _plan(1) == []


L4 = ParallelLayout.tensor_parallel(1, 4)


def _steps(*nodes: ChainNode, layout: ParallelLayout = L4) -> list[tuple[str, str, int | None]]:
    return [(s.op, s.group, s.dim) for s in plan_collectives(list(nodes), layout)]


def src(out) -> ChainNode:
    return ChainNode("a", None, out)


def sink(inp, fuses: bool = False) -> ChainNode:
    return ChainNode("b", inp, None, fuses)


@pytest.mark.parametrize("out, inp, fuses, want", [
    (Partial("attn_tp"), Replicate("attn_tp"), False, ("all_reduce", "attn_tp", None)),
    (Partial("attn_tp"), Replicate("attn_tp"), True,
     ("fused_all_reduce_add_rms_norm", "attn_tp", None)),
    (Partial("dense_tp"), Shard(0, "dense_tp"), True, ("reduce_scatter", "dense_tp", 0)),
    (Shard(-1, "attn_tp"), Replicate("attn_tp"), False, ("all_gather", "attn_tp", -1)),
    (Replicate("attn_tp"), Shard(1, "attn_tp"), False, ("split", "attn_tp", 1)),
    (Replicate("attn_tp"), Replicate("attn_tp"), True, ("none", "attn_tp", None)),
    (Partial("attn_tp"), Partial("attn_tp"), False, ("none", "attn_tp", None)),
    (Shard(0, "attn_tp"), Shard(0, "attn_tp"), False, ("none", "attn_tp", None)),
    # same ranks under another name: reconcilable
    (Partial("attn_tp"), Replicate("moe_tp"), False, ("all_reduce", "attn_tp", None)),
    # replicated over the world, the consumer's smaller group is a local view
    (Replicate("attn_tp"), Replicate("moe_ep"), False, ("none", "moe_ep", None)),
])
def test_boundary(out, inp, fuses, want):
    assert _steps(src(out), sink(inp, fuses)) == [want]


def test_group_of_one_needs_nothing():
    # moe_ep has one rank by default: a pending sum over it is already the value
    assert _steps(src(Partial("moe_ep")), sink(Replicate("moe_ep"))) == [("none", "moe_ep", None)]
    assert _steps(src(Partial("attn_tp")), sink(Replicate("attn_tp")),
                  layout=ParallelLayout.single()) == [("none", "attn_tp", None)]


@pytest.mark.parametrize("out, inp, message", [
    (Shard(0, "attn_tp"), Shard(1, "attn_tp"), "needs an all-to-all"),
    (Shard(0, "attn_tp"), Partial("attn_tp"), "cannot become a pending sum"),
    (Replicate("attn_tp"), Partial("attn_tp"), "no module should declare a Partial input"),
])
def test_irreconcilable(out, inp, message):
    with pytest.raises(PlacementError, match=message) as e:
        _steps(src(out), sink(inp))
    assert "a -> b" in str(e.value)  # names both modules


def test_group_mismatch_names_groups_and_ranks():
    layout = ParallelLayout.tensor_parallel(0, 4, moe_ep_size=2)  # moe_tp = {0,1}, moe_ep = {0,2}
    assert layout.ranks("moe_tp") == (0, 1) and layout.ranks("moe_ep") == (0, 2)
    with pytest.raises(PlacementError) as e:
        _steps(src(Partial("moe_tp")), sink(Replicate("moe_ep")), layout=layout)
    msg = str(e.value)
    assert "Partial(moe_tp) (ranks [0, 1])" in msg and "Replicate(moe_ep) (ranks [0, 2])" in msg


def test_chain_shape_errors():
    with pytest.raises(PlacementError, match="must start at a source"):
        plan_collectives([ChainNode("x", Replicate(), Replicate()), sink(Replicate())], L4)
    with pytest.raises(PlacementError, match="must end at a sink"):
        plan_collectives([src(Replicate()), ChainNode("y", Replicate(), Replicate())], L4)
    with pytest.raises(PlacementError, match="takes no hidden-state input"):
        plan_collectives([src(Replicate()), ChainNode("z", None, Replicate()),
                          sink(Replicate())], L4)


def test_non_placed_module_on_chain():
    class Bad(nn.Module):
        def placement_chain(self):
            yield "lin", nn.Linear(2, 2)

    with pytest.raises(PlacementError, match="lin: Linear is on the placement chain"):
        chain_nodes(Bad())


def test_weight_plan_tp4_gqa_replication_and_vocab_padding():
    # 4 q heads, 2 kv heads of 16 dims over 4 ranks; vocab 150 -> 38 rows per rank
    for rank in range(4):
        model = _llama(4, rank, vocab_size=150)
        plan = plan_weights(model, ParallelLayout.tensor_parallel(rank, 4)).slices
        q, = plan["model.layers.0.self_attn.q_proj.weight"]
        k, = plan["model.layers.0.self_attn.k_proj.weight"]
        assert (q.src_dim, q.src_start, q.length, q.dst_start) == (0, 16 * rank, 16, 0)
        assert (k.src_dim, k.src_start, k.length, k.dst_start) == (0, 16 * (rank // 2), 16, 16)
        o, = plan["model.layers.0.self_attn.o_proj.weight"]
        assert (o.src_dim, o.src_start, o.length) == (1, 16 * rank, 16)
        emb, = plan["model.embed_tokens.weight"]
        assert (emb.src_start, emb.length) == (38 * rank, 38 if rank < 3 else 36)
        norm, = plan["model.norm.weight"]
        assert norm.src_dim is None
        assert model.model.embed_tokens.weight.shape == (38, 64)


def test_weight_plan_errors():
    class Owner(Placed):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(3))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Owner()

    with pytest.raises(PlacementError, match=r"block: owns parameters \['w'\] but declares no"):
        plan_weights(M(), ParallelLayout.single())
    with pytest.raises(ValueError, match="k_proj: 3 units of 16 cannot be split over 2 ranks"):
        _llama(2, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    with pytest.raises(ValueError, match="k_proj: 3 units cannot be replicated evenly over 4"):
        _llama(4, num_attention_heads=12, num_key_value_heads=3, hidden_size=192)
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tp_size 8"):
        _llama(8)
