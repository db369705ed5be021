"""Registry: priority order, supports predicates, caching, overrides, explain."""
import pytest
import torch

import kernels
from kernels import registry

OP = "test_registry_op"


@pytest.fixture
def fake_op():
    calls = []

    @kernels.register(OP, backend="slow", priority=0)
    def slow(x):
        return ("slow", x)

    @kernels.register(OP, backend="fast", priority=10,
                      supports=lambda f: f["device"] == "cuda" and f.get("head_dim", 0) <= 256)
    def fast(x):
        return ("fast", x)

    def picky_pred(f):
        calls.append(dict(f))
        return f["dtype"] == torch.float16

    @kernels.register(OP, backend="picky", priority=5, supports=picky_pred)
    def picky(x):
        return ("picky", x)

    yield calls
    for b in ("slow", "fast", "picky"):
        kernels.unregister(OP, b)


def test_highest_priority_supported_wins(fake_op):
    assert kernels.select(OP, device="cuda", dtype=torch.bfloat16, head_dim=128)(1) == ("fast", 1)
    assert kernels.select(OP, device="cuda", dtype=torch.bfloat16, head_dim=512)(1) == ("slow", 1)
    assert kernels.select(OP, device="cuda", dtype=torch.float16, head_dim=512)(1) == ("picky", 1)
    assert kernels.select(OP, device=torch.device("cpu"), dtype=torch.float32)(2) == ("slow", 2)
    assert kernels.backends(OP) == ["fast", "picky", "slow"]


def test_selection_is_cached_per_features(fake_op):
    calls = fake_op
    kernels.select(OP, device="cpu", dtype=torch.float16, head_dim=64)
    n = len(calls)
    kernels.select(OP, device="cpu", dtype=torch.float16, head_dim=64)
    assert len(calls) == n
    kernels.select(OP, device="cpu", dtype=torch.float16, head_dim=32)
    assert len(calls) == n + 1


def test_overrides_force_and_validate(fake_op):
    kernels.set_overrides({OP: "slow"})
    assert kernels.select(OP, device="cuda", dtype=torch.bfloat16, head_dim=128)(0)[0] == "slow"
    kernels.set_overrides({OP: "fast"})
    with pytest.raises(kernels.KernelError, match=f"{OP}.*fast"):
        kernels.select(OP, device="cpu", dtype=torch.float32)
    with pytest.raises(kernels.KernelError, match="nosuch"):
        kernels.set_overrides({OP: "nosuch"})
    with pytest.raises(kernels.KernelError, match="not_an_op"):
        kernels.set_overrides({"not_an_op": "torch"})
    kernels.set_overrides({})
    assert kernels.select(OP, device="cpu", dtype=torch.float32)(0)[0] == "slow"


def test_explain_lists_every_candidate_and_reason(fake_op):
    text = kernels.explain(OP, device="cpu", dtype=torch.float32)
    assert "slow (priority 0): SELECTED" in text
    assert "fast (priority 10): refused" in text
    assert "picky (priority 5): refused" in text
    text = kernels.explain(OP, device="cuda", dtype=torch.float16, head_dim=8)
    assert "fast (priority 10): SELECTED" in text
    assert "picky (priority 5): skipped (lower priority)" in text
    kernels.set_overrides({OP: "slow"})
    text = kernels.explain(OP, device="cuda", dtype=torch.float16, head_dim=8)
    assert "override" in text and "slow (priority 0): SELECTED" in text
    assert "fast (priority 10): skipped (override)" in text


def test_predicate_that_raises_refuses(fake_op):
    @kernels.register(OP, backend="broken", priority=99, supports=lambda f: f["missing"] > 0)
    def broken(x):
        return ("broken", x)
    try:
        assert kernels.select(OP, device="cpu", dtype=torch.float32)(0)[0] == "slow"
        assert "KeyError" in kernels.explain(OP, device="cpu", dtype=torch.float32)
    finally:
        kernels.unregister(OP, "broken")


def test_unknown_op_and_no_support():
    with pytest.raises(kernels.KernelError, match="unknown kernel op"):
        kernels.select("no_such_op", device="cpu", dtype=torch.float32)

    @kernels.register(OP + "_none", backend="never", supports=lambda f: False)
    def never(x):
        return x
    try:
        with pytest.raises(kernels.KernelError, match="no implementation"):
            kernels.select(OP + "_none", device="cpu", dtype=torch.float32)
    finally:
        kernels.unregister(OP + "_none", "never")


def test_every_interface_op_has_a_torch_reference():
    for op in registry.OPS:
        assert "torch" in kernels.backends(op), op
        assert kernels.select(op, device="cpu", dtype=torch.float32) is not None


@pytest.mark.slow
def test_kernels_import_without_triton():
    """A machine without triton: `import kernels` works and torch serves every op."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels\n"
            "assert kernels.selected_backend('decode_attention', device='cuda',"
            " dtype=torch.bfloat16) == 'torch'\n"
            "assert all('torch' in kernels.backends(op) and 'triton' not in kernels.backends(op)"
            " for op in kernels.OPS)\n")
    root = __file__.rsplit("/tests/", 1)[0]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("op", ["decode_attention", "extend_attention", "mla_decode",
                                "mla_extend", "fused_moe"])
def test_tensor_core_kernels_serve_16_bit_only(op):
    """float32 tiles overflow shared memory at real shapes: the torch reference serves them."""
    pytest.importorskip("triton")
    assert kernels.selected_backend(op, device="cuda", dtype=torch.bfloat16) == "triton"
    assert kernels.selected_backend(op, device="cuda", dtype=torch.float32) == "torch"


def test_the_triton_backend_keeps_fp_fusion_on_without_a_warning():
    """Kernels were tuned with FP fusion, Triton's default until 3.10 (3.9 warns when the
    default is left unset); importing the backend keeps it on, silently."""
    import os
    import warnings

    triton = pytest.importorskip("triton")
    import kernels.triton  # noqa: F401

    # set, so no Triton warns (its warning fires once a process: catching it is not enough)
    assert os.environ.get("TRITON_DEFAULT_FP_FUSION") in ("1", "true", "True", "0")

    language = getattr(getattr(triton, "knobs", None), "language", None)
    if not hasattr(language, "fp_fusion_enabled"):
        pytest.skip("this Triton has no fp_fusion_enabled knob")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert language.fp_fusion_enabled(None) is True


def test_an_op_whose_last_backend_is_unregistered_is_not_listed():
    @kernels.register("test_registry_gone", backend="only")
    def only(x):
        return x

    assert "test_registry_gone" in kernels.registered_ops()
    kernels.unregister("test_registry_gone", "only")
    assert "test_registry_gone" not in kernels.registered_ops()
    with pytest.raises(kernels.KernelError, match="unknown kernel op"):
        kernels.backends("test_registry_gone")
