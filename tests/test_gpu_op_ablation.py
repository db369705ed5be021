"""scripts/gpu_op_ablation.py's patches on CPU models: each ablation touches the modules it
names, the step still runs with it (taking the norms out changes the logits), and leaving it
restores the model (to the CPU backend's run-to-run noise: its linear layers settle on a
BLAS path over the first calls)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import gpu_op_ablation as A  # noqa: E402
from gpu_spec_verify import PAGE, plan_arrays  # noqa: E402

from appliance.engine.engine import to_forward_batch  # noqa: E402
from appliance.model import ModelRunner, ModelSource  # noqa: E402

SMALL = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, vocab_size=256,
             moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=None,
             qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
# ablations that must find something to patch in each model
EXPECTED = {"llama-3.1-8b": {"norms", "rope_kv", "rope_apart", "new_key_from_cache", "attention", "merge", "one_split", "small",
                             "generic_decode", "gqa_merge_launch", "gqa_splits=2",
                             "gqa_tiles=32,2", "coarse_cap", "fold_norms", "no_fold",
                             "gqa_last_merge", "gqa_last_merge+gqa_splits=1",
                             "fold_only=attention", "fold_only=mlp", "fold_only=head"},
            "deepseek-v2-lite": {"norms", "attention", "merge", "one_split", "absorbed",
                                 "routed", "small", "mla_splits=1", "moe_grouped",
                                 "head_einsum", "router_after_wait", "coarse_cap",
                                 "shared_apart", "x_proj_apart", "merge_apart",
                                 "route", "absorb_apart", "rope_kv", "fold_norms", "no_fold",
                                 "fold_only=router", "fold_only=mla", "fold_only=head"}}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_each_ablation_patches_runs_and_restores(preset):
    torch.manual_seed(0)
    runner = ModelRunner(ModelSource(preset=preset, load_format="dummy", hf_overrides=SMALL),
                         device="cpu", dtype=torch.float32, kv_num_pages=32, page_size=PAGE)
    arrays = plan_arrays(1, 0, 40, runner.vocab_size, np.random.default_rng(0))
    before = runner.forward(to_forward_batch(arrays, runner.device)).clone()
    names = list(A.ABLATIONS) + ["gqa_splits=2", "mla_splits=1", "gqa_tiles=32,2",
                                 "gqa_last_merge+gqa_splits=1"] + [
        f"fold_only={kind}" for kind in sorted(A.norm_layers.FOLD_KINDS)]
    found = set()
    for name in names:
        patches = A.plan(A._checked(name))(runner.model)
        if patches:
            found.add(name)
        with A.patched(patches):
            out = runner.forward(to_forward_batch(arrays, runner.device))
        assert out.shape == before.shape
        if name == "norms":
            assert (out - before).abs().max() > 1e-3
    assert EXPECTED[preset] <= found
    after = runner.forward(to_forward_batch(arrays, runner.device))
    assert torch.allclose(before, after, rtol=0, atol=1e-5)


def test_unknown_names_are_rejected():
    for bad in ("foo", "gqa_splits=x", "foo_splits=2", "gqa_tiles=32", "norms+foo"):
        with pytest.raises(Exception, match="unknown ablation"):
            A._checked(bad)


def test_fold_only_leaves_one_consumer_kind_folding():
    runner = ModelRunner(ModelSource(preset="llama-3.1-8b", load_format="dummy", hf_overrides=SMALL),
                         device="cpu", dtype=torch.float32, kv_num_pages=32, page_size=PAGE)
    layer = runner.model.model.layers[0]

    def folding() -> set[str]:
        return {kind for kind, norm, consumer in (
            ("attention", layer.input_layernorm, layer.self_attn),
            ("mlp", layer.post_attention_layernorm, layer.mlp),
            ("head", runner.model.model.norm, runner.model.lm_head)) if norm.folds_into(consumer)}
    assert folding() == set()                  # the CPU folds nothing by default
    with A.patched(A.plan("fold_only=mlp")(runner.model)):
        assert folding() == {"mlp"}
    with A.patched(A.plan("fold_norms")(runner.model)):
        assert folding() == {"attention", "mlp", "head"}
    assert folding() == set()
    with pytest.raises(Exception, match="unknown ablation"):
        A._checked("fold_only=nothing")



def test_unscaled_runs_the_same_function_the_old_way(monkeypatch):
    """With the norms' scales in the weights (as on CUDA), `unscaled` runs those norms as
    before (their weight, now ones, read by their ops; the MLP's and the head's norms in
    launches of their own): the same logits."""
    monkeypatch.setattr(A.norm_layers, "FOLD_NORMS_ON", frozenset({"cpu"}))
    runner = ModelRunner(ModelSource(preset="llama-3.1-8b", load_format="dummy", hf_overrides=SMALL),
                         device="cpu", dtype=torch.float32, kv_num_pages=32, page_size=PAGE)
    arrays = plan_arrays(1, 0, 40, runner.vocab_size, np.random.default_rng(0))
    layer = runner.model.model.layers[0]
    mlp_norm = layer.post_attention_layernorm
    before = runner.forward(to_forward_batch(arrays, runner.device)).clone()
    assert mlp_norm.unit_scale and mlp_norm.folds_into(layer.mlp)
    patches = A.plan("unscaled")(runner.model)
    with A.patched(patches):
        assert not mlp_norm.unit_scale and not mlp_norm.folds_into(layer.mlp)
        out = runner.forward(to_forward_batch(arrays, runner.device))
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-4)
    assert mlp_norm.unit_scale and mlp_norm.folds_into(layer.mlp)
