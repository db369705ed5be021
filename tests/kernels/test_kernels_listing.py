"""`tokenspeed kernels`: every implementation, including backends unavailable on this machine,
with the reason (triton not importable, no CUDA device, a plugin that failed)."""

from __future__ import annotations

import sys

import pytest
import torch

import kernels
from appliance.cli import main
from kernels import plugins, registry


@pytest.fixture()
def fresh_unavailable(monkeypatch):
    monkeypatch.setattr(registry, "_unavailable", {})


def test_triton_ops_declared_for_listing_are_the_ones_it_registers():
    pytest.importorskip("triton")
    import kernels.triton  # noqa: F401  (the registry imports it only where CUDA is)

    registered = {op for op in kernels.registered_ops() if "triton" in kernels.backends(op)}
    assert registered == set(kernels.TRITON_OPS)


def test_triton_that_does_not_import_is_listed_with_the_reason(fresh_unavailable, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # so that it tries
    monkeypatch.setitem(sys.modules, "kernels.triton", None)  # `import kernels.triton` fails
    kernels._load_triton_backend()
    (entry,) = kernels.unavailable().values()
    assert entry.backend == "triton" and entry.reason.startswith("not importable (ModuleNotFoundError")
    listing = kernels.listing()
    assert "triton: not importable (ModuleNotFoundError" in listing
    assert all(op in listing for op in kernels.TRITON_OPS)


def test_triton_without_a_cuda_device_says_so(fresh_unavailable, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "kernels.triton", None)   # not even imported
    kernels._load_triton_backend()
    assert kernels.unavailable()["triton"].reason == "needs a CUDA device (torch sees none)"
    assert "triton: unavailable on this machine: needs a CUDA device" in kernels.explain("rms_norm")


def test_a_plugin_that_fails_is_listed(fresh_unavailable, monkeypatch):
    class BrokenEntryPoint:
        name, value = "broken", "broken_pkg.kernels"

        def load(self):
            raise ImportError("No module named 'broken_pkg'")

    monkeypatch.setattr(plugins, "_entry_points", lambda: [BrokenEntryPoint()])
    monkeypatch.setattr(plugins, "failed", {})
    with pytest.warns(RuntimeWarning):
        plugins.load_plugins()
    assert "broken: plugin broken_pkg.kernels failed to load (ImportError: No module named 'broken_pkg')" \
        in kernels.listing()


def test_cli_lists_every_op_and_the_unavailable_backends(fresh_unavailable, monkeypatch, capsys):
    registry.mark_unavailable("triton", "needs a CUDA device (torch sees none)", kernels.TRITON_OPS)
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("  ") and
             not line.startswith("  triton:")}
    assert set(lines) == set(kernels.registered_ops())
    assert all("torch (priority 0)" in line for line in lines.values())
    assert {op for op, line in lines.items() if "triton (priority 10, unavailable)" in line} == set(kernels.TRITON_OPS)
    assert out.rstrip().endswith("unavailable on this machine:\n  triton: needs a CUDA device (torch sees none)")


def test_cli_explain_of_an_unknown_op_is_one_line_and_bad_devices_are_refused(capsys):
    assert main(["kernels", "--explain", "no_such_op"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenspeed kernels: ") and "Traceback" not in err
    for bad in (["--device", "tpu"], ["--dtype", "int3"]):
        with pytest.raises(SystemExit):
            main(["kernels", *bad])
