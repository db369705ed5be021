"""Programmatic dependent launch (kernels/triton/pdl.py): where it is on, and on a GPU that a
chain of dependent kernels launched with it computes what it computes without it.

The compiled side (griddepcontrol before any load, the GEMV's L2 prefetch before the wait) is
checked for sm_90 on the CPU by test_kernels_compile.py's `pdl` check."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kernels.triton import pdl  # noqa: E402

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fresh(monkeypatch):
    """pdl_enabled re-read under the test's environment, and cleared again after it."""
    pdl.pdl_enabled.cache_clear()
    yield monkeypatch
    pdl.pdl_enabled.cache_clear()


def test_off_on_the_cpu_and_under_the_interpreter(fresh):
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}
    fresh.setenv("TRITON_INTERPRET", "1")
    assert pdl.pdl_launch(CUDA0) == {"PDL": False}


@pytest.mark.parametrize("capability, env, expected", [
    ((9, 0), None, True), ((10, 0), None, True), ((8, 9), None, False), ((9, 0), "0", False)])
def test_on_from_hopper_unless_turned_off(fresh, capability, env, expected):
    fresh.delenv("TRITON_INTERPRET", raising=False)
    if env is None:
        fresh.delenv(pdl.ENV, raising=False)
    else:
        fresh.setenv(pdl.ENV, env)
    fresh.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    launch = pdl.pdl_launch(CUDA0)
    assert launch == ({"PDL": True, "launch_pdl": True} if expected else {"PDL": False})


def _chain(x: torch.Tensor, norm_w: torch.Tensor, up: torch.Tensor, down: torch.Tensor
           ) -> torch.Tensor:
    """A decode layer's one-row kernels, each reading what the one before wrote."""
    from kernels.triton.elementwise import fused_add_rms_norm, silu_and_mul
    from kernels.triton.gemv import gemv

    residual = x
    for _ in range(8):
        h, residual = fused_add_rms_norm(x, residual, norm_w, 1e-6)
        x = gemv(silu_and_mul(gemv(h, up)), down)
    return x + residual


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() < (9, 0), reason="needs sm_90+")
def test_a_chain_in_a_cuda_graph_computes_the_same_with_pdl(fresh):
    fresh.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    h, inter = 2048, 4096
    x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16, generator=g)
    norm_w = torch.rand(h, device="cuda", dtype=torch.bfloat16, generator=g) + 0.5
    up = torch.randn(2 * inter, h, device="cuda", dtype=torch.bfloat16, generator=g) * h ** -0.5
    down = torch.randn(h, inter, device="cuda", dtype=torch.bfloat16, generator=g) * inter ** -0.5
    outs = {}
    for on in (False, True):
        fresh.setenv(pdl.ENV, "1" if on else "0")
        pdl.pdl_enabled.cache_clear()
        assert pdl.pdl_launch(x.device)["PDL"] is on
        _chain(x, norm_w, up, down)                                  # compile outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _chain(x, norm_w, up, down)
        results = []
        for _ in range(20):
            graph.replay()
            results.append(out.clone())
        torch.cuda.synchronize()
        assert all(torch.equal(results[0], r) for r in results), f"PDL {on}: replays differ"
        outs[on] = results[0]
    assert torch.equal(outs[False], outs[True])
    assert torch.isfinite(outs[True]).all()
