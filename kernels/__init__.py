"""TokenSpeed kernels: a registry of op implementations chosen per device/dtype/shape.

    import kernels
    fn = kernels.select("rms_norm", device="cuda", dtype=torch.bfloat16, hidden=4096)
    print(kernels.explain("rms_norm", device="cuda", dtype=torch.bfloat16))

Backends: "torch" (kernels/reference, priority 0, everywhere) and "triton" (kernels/triton,
priority 10, CUDA only, loaded lazily and only if triton imports); out-of-tree backends via the
`tokenspeed.kernels` entry-point group. Imports torch (and triton when present), nothing else.
"""
from __future__ import annotations

import warnings

from kernels import plugins, reference, registry  # noqa: F401  (reference registers "torch")
from kernels.registry import (OPS, REFERENCE_ONLY, KernelError, backends, explain, overrides, register,
                              registered_ops, select, selected_backend, set_overrides,
                              unregister)


def _load_triton_backend() -> None:
    try:
        import kernels.triton  # noqa: F401  (registers the triton backend)
    except ImportError:
        pass  # no triton on this machine: the torch backend serves every op
    except Exception as e:  # noqa: BLE001 - a broken triton install must not take us down
        warnings.warn(f"kernels: triton backend not loaded ({type(e).__name__}: {e}); "
                      "using the torch reference", RuntimeWarning, stacklevel=2)


def rescan_plugins() -> None:
    """Look for `tokenspeed.kernels` entry points again before the next lookup."""
    registry.add_lazy_loader(plugins.load_plugins)


registry.add_lazy_loader(_load_triton_backend)
registry.add_lazy_loader(plugins.load_plugins)

__all__ = ["OPS", "REFERENCE_ONLY", "KernelError", "register", "unregister", "select", "selected_backend",
           "explain", "set_overrides", "overrides", "backends", "registered_ops",
           "rescan_plugins"]
