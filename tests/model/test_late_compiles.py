"""LateCompiles: kernel variants first launched while serving, counted through Triton's hooks."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from appliance.model import compile_hooks, late_compiles
from appliance.model.late_compiles import LateCompiles


def _hook_kwargs(name: str, key: str) -> dict:
    # what Triton's JITFunction._call_hook passes (triton/runtime/jit.py)
    return dict(key=key, repr=f"{name}[...]", fn=SimpleNamespace(module="m", name=name),
                compile={}, is_manual_warmup=False, already_compiled=False)


def test_each_variant_is_counted_once_with_its_time_and_logged(caplog):
    late = LateCompiles()
    caplog.set_level(logging.WARNING, logger=late_compiles.__name__)
    assert late.before(**_hook_kwargs("_paged_attn_kernel", "k1")) is False  # Triton compiles
    late.before(**_hook_kwargs("_gemv", "k2"))
    late.after(**_hook_kwargs("_paged_attn_kernel", "k1"))
    late.after(**_hook_kwargs("_paged_attn_kernel", "k1"))    # no compile began: not counted
    stats = late.stats()
    assert stats["kernel_compiles_total"] == 1 and stats["kernel_compile_seconds_total"] >= 0
    assert "_paged_attn_kernel" in caplog.text and "_gemv" not in caplog.text
    late.after(**_hook_kwargs("_gemv", "k2"))
    assert late.stats()["kernel_compiles_total"] == 2


def test_installed_as_the_runtime_hooks_and_removed(monkeypatch):
    runtime = SimpleNamespace(jit_cache_hook="theirs", jit_post_compile_hook=None)
    monkeypatch.setattr(compile_hooks, "triton_runtime_knobs", lambda: runtime)
    late = LateCompiles()
    assert late.install()
    assert runtime.jit_cache_hook == late.before and runtime.jit_post_compile_hook == late.after
    late.remove()
    assert (runtime.jit_cache_hook, runtime.jit_post_compile_hook) == ("theirs", None)
    monkeypatch.setattr(compile_hooks, "triton_runtime_knobs", lambda: None)
    assert not LateCompiles().install()                       # a Triton without hooks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles only on a GPU")
def test_a_kernel_compiled_while_installed_is_counted():
    import triton
    import triton.language as tl

    @triton.jit
    def _late_compiles_probe(x, n: tl.constexpr):
        tl.store(x + tl.arange(0, n), tl.arange(0, n).to(tl.float32))

    late = LateCompiles()
    assert late.install()
    try:
        out = torch.zeros(16, device="cuda")
        _late_compiles_probe[(1,)](out, 16)
        _late_compiles_probe[(1,)](out, 16)                   # cached: not counted again
        torch.cuda.synchronize()
    finally:
        late.remove()
    assert late.stats()["kernel_compiles_total"] == 1
