"""moe_route against HF transformers' DeepSeek-V2/V3 routers; sample against its definition."""
import pytest
import torch

from kernels import reference as R


def _sorted(w, ids):
    order = ids.long().argsort(dim=1)
    return w.gather(1, order), ids.long().gather(1, order)


def _hf(module_name, cls_name, **cfg):
    mod = pytest.importorskip(f"transformers.models.{module_name}.modeling_{module_name}")
    conf_mod = pytest.importorskip(f"transformers.models.{module_name}.configuration_{module_name}")
    conf_cls = [getattr(conf_mod, n) for n in dir(conf_mod) if n.endswith("Config")][0]
    conf = conf_cls(**cfg)
    router = getattr(mod, cls_name)(conf)
    torch.nn.init.normal_(router.weight)
    return router


@pytest.mark.parametrize("method,n_group,topk_group", [("greedy", 1, 1),
                                                        ("group_limited_greedy", 4, 2)])
def test_route_matches_hf_deepseek_v2(method, n_group, topk_group):
    router = _hf("deepseek_v2", "DeepseekV2TopkRouter", hidden_size=32, n_routed_experts=16,
                 num_experts_per_tok=3, topk_method=method, n_group=n_group,
                 topk_group=topk_group, routed_scaling_factor=2.5)
    x = torch.randn(7, 32)
    logits, w_hf, id_hf = router(x)
    w, ids = R.moe_route(logits, 3, "softmax", False, None, n_group, topk_group, 2.5)
    a, b = _sorted(w, ids), _sorted(w_hf.float(), id_hf)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-6)


def test_route_matches_hf_deepseek_v3():
    router = _hf("deepseek_v3", "DeepseekV3TopkRouter", hidden_size=32, n_routed_experts=32,
                 num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True,
                 routed_scaling_factor=2.5)
    router.e_score_correction_bias.copy_(torch.randn(32) * 0.5)
    x = torch.randn(9, 32)
    logits, w_hf, id_hf = router(x)
    w, ids = R.moe_route(logits, 4, "sigmoid", True, router.e_score_correction_bias, 4, 2, 2.5)
    a, b = _sorted(w, ids), _sorted(w_hf.float(), id_hf)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-6)
    # the bias steers the choice only: weights are the plain sigmoid scores, renormalized
    s = logits.float().sigmoid().gather(1, ids.long())
    assert torch.allclose(w, s / s.sum(1, keepdim=True) * 2.5, atol=1e-6)


def _args(b, temp, k, p):
    return (torch.full((b,), temp), torch.full((b,), k, dtype=torch.int32),
            torch.full((b,), p), torch.full((b,), 1234, dtype=torch.int64),
            torch.arange(b, dtype=torch.int64))


def test_sample_greedy_and_determinism():
    logits = torch.randn(6, 50)
    assert torch.equal(R.sample(logits, *_args(6, 0.0, 0, 1.0)).long(), logits.argmax(1))
    assert torch.equal(R.sample(logits, *_args(6, 0.7, 1, 1.0)).long(), logits.argmax(1))
    a = R.sample(logits, *_args(6, 1.0, 0, 1.0))
    assert torch.equal(a, R.sample(logits, *_args(6, 1.0, 0, 1.0)))  # pure function
    flat = torch.zeros(64, 50)
    t, k, p, seeds, pos = _args(64, 1.0, 0, 1.0)
    draws = R.sample(flat, t, k, p, seeds, pos)
    assert len(set(draws.tolist())) > 20   # uniform logits: positions give different tokens
    assert not torch.equal(R.sample(flat, t, k, p, seeds + 1, pos), draws)  # seeds matter


def test_sample_distribution_matches_softmax():
    n, v = 6000, 6
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    logits = base.repeat(n, 1)
    draws = R.sample(logits, *_args(n, 0.8, 0, 1.0))
    freq = torch.bincount(draws.long(), minlength=v).double() / n
    want = torch.softmax(base.double() / 0.8, 0)
    assert (freq - want).abs().max() < 0.025


def test_sample_top_k_and_top_p_sets():
    n = 400
    base = torch.tensor([3.0, 2.9, 1.0, 0.5, 0.4, -1.0, 2.0, 0.0])
    logits = base.repeat(n, 1)
    got = set(R.sample(logits, *_args(n, 1.0, 3, 1.0)).tolist())
    assert got == {0, 1, 6}
    probs = torch.softmax(base.double(), 0)
    order = probs.argsort(descending=True).tolist()
    keep, mass = set(), 0.0
    for i in order:          # smallest prefix whose mass reaches p
        keep.add(i)
        mass += float(probs[i])
        if mass >= 0.8:
            break
    got = set(R.sample(logits, *_args(n, 1.0, 0, 0.8)).tolist())
    assert got == keep
