"""A pre-norm layer's RMSNorm inside the first op that reads it (layers/norm.py:
`rms_norm_linear`, or a MoE router's `rms_norm_router_logits`), switched on for the CPU
here: a prefill step's and a decode step's logits are the unfolded model's, the folded norms
launch no norm op of their own, a norm with a collective fused in (tensor parallelism)
stays apart, and by default only the kinds measured to win fold (on CUDA)."""
from __future__ import annotations

import torch

from appliance.model import ModelRunner
from appliance.model.layers import norm as norm_module
from appliance.model.layers.moe import TopKRouter
from test_verify_rows import PS, batch_of, model_folder  # noqa: F401 (the fixture)


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


def test_by_default_only_the_kinds_measured_to_win_fold(model_folder, monkeypatch):
    """FOLDED_KINDS: attention's q|k|v (and MLA's q|kv_a), not the MLP's gate|up or the head."""
    monkeypatch.setattr(norm_module, "FOLD_NORMS_ON", frozenset({"cpu"}))
    runner = ModelRunner(model_folder, kv_num_pages=16, page_size=PS)
    layer = runner.model.model.layers[0]
    assert layer.input_layernorm.folds_into(layer.self_attn)
    assert not layer.post_attention_layernorm.folds_into(layer.mlp)
    assert not runner.model.model.norm.folds_into(runner.model.lm_head)

