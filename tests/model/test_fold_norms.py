"""A pre-norm layer's RMSNorm inside the first op that reads it (layers/norm.py:
`rms_norm_linear`, or a MoE router's `rms_norm_router_logits`), switched on for the CPU
here: a prefill step's and a decode step's logits are the unfolded model's, the folded norms
launch no norm op of their own, a norm with a collective fused in (tensor parallelism)
stays apart, and by default only the kinds measured to win fold (on CUDA)."""
from __future__ import annotations

import torch

from appliance.model import ModelRunner
from appliance.model.layers import norm as norm_module
from appliance.model.layers.mlp import SwiGLUMLP
from appliance.model.layers.moe import TopKRouter
from test_verify_rows import PS, batch_of, hf_logits, model_folder  # noqa: F401 (the fixture)
from helpers import save_tiny_hf_model


def _two_steps(runner: ModelRunner) -> list[torch.Tensor]:
    """The logits of a 2-row prefill, then of one decode token in each row."""
    a, b = [5, 9, 33, 7, 100, 21], [8, 8, 17]
    first = runner.forward(batch_of([(a, 0, [0, 1]), (b, 0, [2])], 0, None))
    second = runner.forward(batch_of([([40], len(a), [0, 1]), ([41], len(b), [2])], 2, None))
    one = runner.forward(batch_of([([42], len(a) + 1, [0, 1])], 1, None))
    return [first, second, one]


def test_folded_norms_give_the_unfolded_logits(model_folder, monkeypatch):
    want = _two_steps(ModelRunner(model_folder, kv_num_pages=16, page_size=PS))
    monkeypatch.setattr(norm_module, "FOLD_NORMS_ON", frozenset({"cpu"}))
    monkeypatch.setattr(norm_module, "FOLDED_KINDS", norm_module.FOLD_KINDS)
    runner = ModelRunner(model_folder, kv_num_pages=16, page_size=PS)
    calls = {"norm": 0, "folded": 0}
    ops = {norm_module.RMSNorm: (("rms_norm", "norm"), ("fused_add_rms_norm", "norm"),
                                 ("rms_norm_linear", "folded")),
           TopKRouter: (("normed_logits", "folded"),)}
    for m in runner.model.modules():
        for name, key in ops.get(type(m), ()):
            def counted(*args, _real=getattr(m, name), _key=key):
                calls[_key] += 1
                return _real(*args)
            setattr(m, name, counted)
    got = _two_steps(runner)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # each step: every norm folded (input norms into q|k|v or MLA's q|kv_a, post-attention
    # ones into the dense MLP's gate|up or the MoE's router, the final one into the LM head)
    assert calls["folded"] == 3 * (1 + 2 * len(runner.model.model.layers))
    assert calls["norm"] == 0


def test_a_norm_with_a_fused_reduce_stays_apart(model_folder, monkeypatch):
    monkeypatch.setattr(norm_module, "FOLD_NORMS_ON", frozenset({"cpu"}))
    monkeypatch.setattr(norm_module, "FOLDED_KINDS", norm_module.FOLD_KINDS)
    runner = ModelRunner(model_folder, kv_num_pages=16, page_size=PS)
    layer = runner.model.model.layers[0]
    assert layer.input_layernorm.folds_into(layer.self_attn)
    layer.input_layernorm.set_fused_reduce(lambda *args: None)
    assert not layer.input_layernorm.folds_into(layer.self_attn)
    handle = layer.mlp.register_forward_hook(lambda *args: None)
    assert not layer.post_attention_layernorm.folds_into(layer.mlp)
    handle.remove()
    monkeypatch.setattr(norm_module, "FOLD_NORMS_ON", frozenset())
    assert not layer.post_attention_layernorm.folds_into(layer.mlp)


def test_norms_fold_on_cuda_unless_the_environment_says_0():
    assert norm_module.fold_norms_on({}) == frozenset({"cuda"})
    assert norm_module.fold_norms_on({"TOKENSPEED_FOLD_NORMS": "1"}) == frozenset({"cuda"})
    assert norm_module.fold_norms_on({"TOKENSPEED_FOLD_NORMS": "0"}) == frozenset()


def test_by_default_the_kinds_measured_to_win_fold(model_folder, monkeypatch):
    """FOLDED_KINDS (attention's q|k|v, MLA's q|kv_a) fold as they are; the dense MLP's gate|up
    and an untied head take their norm's scale into their weight at load (SCALED_KINDS) and
    then fold with a unit scale; a MoE's router does not fold, nor does the head of a model
    whose final norm also feeds MTP layers (DeepSeek) take its scale."""
    monkeypatch.setattr(norm_module, "FOLD_NORMS_ON", frozenset({"cpu"}))
    runner = ModelRunner(model_folder, kv_num_pages=16, page_size=PS)
    model = runner.model
    head_scaled = not model.lm_head.tied and not hasattr(model, "mtp_layers")
    assert model.model.norm.unit_scale == head_scaled
    assert model.model.norm.folds_into(model.lm_head) == head_scaled
    for layer in model.model.layers:
        attn_norm, mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        assert attn_norm.folds_into(layer.self_attn)
        assert attn_norm.unit_scale == (layer.self_attn.fold_kind == "attention")
        dense = isinstance(layer.mlp, SwiGLUMLP)
        assert mlp_norm.unit_scale == mlp_norm.folds_into(layer.mlp) == dense
    assert any(isinstance(m, norm_module.RMSNorm) and m.unit_scale for m in model.modules())


def test_scaled_norms_weights_hold_the_scale_and_the_norms_are_ones(model_folder, monkeypatch):
    """The load folds each planned norm's scale into its consumer's weight columns."""
    plain = ModelRunner(model_folder, kv_num_pages=16, page_size=PS).model
    monkeypatch.setattr(norm_module, "FOLD_NORMS_ON", frozenset({"cpu"}))
    scaled = ModelRunner(model_folder, kv_num_pages=16, page_size=PS).model
    pairs = [(n, c) for m in scaled.modules() for n, c in getattr(m, "norm_consumers",
                                                                   lambda: ())()]
    names = {id(t): name for name, t in scaled.named_modules()}
    plain_modules = dict(plain.named_modules())
    for norm, consumer in pairs:
        if not norm.unit_scale:
            continue
        target = consumer.scale_target
        g = plain_modules[names[id(norm)]].weight
        assert torch.equal(norm.weight, torch.ones_like(g))
        torch.testing.assert_close(target.weight, plain_modules[names[id(target)]].weight * g)


def test_one_token_with_the_scales_in_the_weights_runs_no_norm_op(monkeypatch, tmp_path):
    """One token through a dense Llama whose norms' scales went into their consumers' weights:
    every norm runs inside its consumer's op (no norm op of its own), reading no norm weight,
    and the logits are the unscaled model's and HF transformers' (float32). Two rows fold the
    same norms (the op then runs the norm kernel first)."""
    folder = save_tiny_hf_model(tmp_path / "llama", "llama", seed=5)
    plain = ModelRunner(folder, kv_num_pages=16, page_size=PS)
    monkeypatch.setattr(norm_module, "FOLD_NORMS_ON", frozenset({"cpu"}))
    runner = ModelRunner(folder, kv_num_pages=16, page_size=PS)
    calls = {"norm": 0, "folded": 0, "weighted": 0}
    for m in runner.model.modules():
        if not isinstance(m, norm_module.RMSNorm):
            continue
        for name, key in (("fused_add_rms_norm", "norm"), ("rms_norm", "norm"),
                          ("rms_norm_linear", "folded")):
            def counted(*args, _real=getattr(m, name), _key=key):
                calls[_key] += 1
                calls["weighted"] += _key == "folded" and args[2] is not None
                return _real(*args)
            setattr(m, name, counted)
    layers = len(runner.model.model.layers)
    prompt = [5, 9, 33, 7]
    for r in (plain, runner):
        r.forward(batch_of([(prompt, 0, [0, 1])], 0, None))
    calls.update(norm=0, folded=0, weighted=0)
    one = batch_of([([42], len(prompt), [0, 1])], 1, None)
    got, want = runner.forward(one), plain.forward(one)
    assert calls == {"norm": 0, "folded": 2 * layers + 1, "weighted": 0}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], hf_logits(folder, prompt + [42])[-1], rtol=1e-4,
                               atol=1e-4)
    calls.update(norm=0, folded=0, weighted=0)
    two = batch_of([([43], len(prompt) + 1, [0, 1]), ([8, 9], 0, [2])], 1, None)
    torch.testing.assert_close(runner.forward(two), plain.forward(two), rtol=1e-5, atol=1e-5)
    assert calls == {"norm": 0, "folded": 2 * layers + 1, "weighted": 0}
