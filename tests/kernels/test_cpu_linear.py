"""The CPU `linear` backend: every way it may take computes F.linear's product, it settles on
one after its trials, and the registry gives it to the CPU only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.cpu import tuned_linear as cpu_linear


@pytest.mark.parametrize("name", sorted(cpu_linear.WAYS))
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_every_way_computes_the_same_product(name, rows):
    if name == "transposed_pair" and rows != 1:
        pytest.skip("one row only")
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 48, generator=gen), torch.randn(200, 48, generator=gen)
    got = cpu_linear.WAYS[name](x, w)
    assert got.shape == (rows, 200) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_small_rows_settle_on_one_way_and_keep_the_contract(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_tuners", {})
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(1, 32, generator=gen), torch.randn(64, 32, generator=gen),
               torch.randn(64, generator=gen))
    calls = cpu_linear.TRIALS * len(cpu_linear.WAYS)   # one row tries all three ways
    for i in range(calls + 2):
        torch.testing.assert_close(cpu_linear.linear(x, w, b), F.linear(x, w, b),
                                   rtol=1e-5, atol=1e-5)
        chosen = cpu_linear.chosen_ways()[(1, 64, 32, torch.float32)]
        assert (chosen is None) == (i < calls - 1), i
    assert chosen in cpu_linear.WAYS


def test_prefill_rows_take_f_linear_untouched(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_tuners", {})
    x, w = torch.randn(cpu_linear.MAX_TUNED_ROWS + 1, 16), torch.randn(8, 16)
    assert torch.equal(cpu_linear.linear(x, w), F.linear(x, w))
    assert cpu_linear.chosen_ways() == {}


def test_the_registry_gives_the_cpu_backend_to_the_cpu_only():
    assert kernels.selected_backend("linear", device="cpu", dtype=torch.float32) == "cpu"
    assert kernels.selected_backend("linear", device="cuda", dtype=torch.bfloat16) != "cpu"


def test_ranks_of_a_process_group_all_take_f_linear(monkeypatch):
    """Replicated values must come out bit for bit alike on every rank: no per-rank timings."""
    monkeypatch.setattr(cpu_linear, "_tuners", {})
    monkeypatch.setattr(cpu_linear, "_in_process_group", lambda: True)
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    for _ in range(3 * cpu_linear.TRIALS):
        assert torch.equal(cpu_linear.linear(x, w), F.linear(x, w))
    assert cpu_linear.chosen_ways() == {}
