"""TokenSpeed kernels: a registry of op implementations chosen per device/dtype/shape.

    import kernels
    fn = kernels.select("rms_norm", device="cuda", dtype=torch.bfloat16, hidden=4096)
    print(kernels.explain("rms_norm", device="cuda", dtype=torch.bfloat16))

Backends: "torch" (kernels/reference, priority 0, everywhere) and "triton" (kernels/triton,
priority 10, CUDA only: loaded lazily, where torch sees CUDA and triton imports); out-of-tree
backends via the `tokenspeed.kernels` entry-point group. Imports torch (and triton where it
loads), nothing else.
"""
from __future__ import annotations

import warnings

from kernels import cpu, plugins, reference, registry  # noqa: F401  (they register "torch", "cpu")
from kernels.moe_activation import ClampedSwiGLU
from kernels.registry import (OPS, REFERENCE_ONLY, KernelError, backends, explain, listing,
                              mark_unavailable, overrides, register, registered_ops, select,
                              selected_backend, set_overrides, unavailable, unregister)


# The ops kernels/triton registers (tests check the two agree), so `tokenspeed kernels` can
# list them on a machine where triton does not import.
TRITON_OPS: tuple[str, ...] = tuple(op for op in OPS if op not in REFERENCE_ONLY)


def _load_triton_backend() -> None:
    import torch

    # Every Triton op needs a CUDA device: without one, importing them (0.8 s of a CPU daemon's
    # 4 s start-up on a 2-core box: Triton reads each kernel's source) would buy nothing.
    if not torch.cuda.is_available():
        registry.mark_unavailable("triton", "needs a CUDA device (torch sees none)", TRITON_OPS)
        return
    try:
        import kernels.triton  # noqa: F401  (registers the triton backend)
    except ImportError as e:  # no triton on this machine: the torch backend serves every op
        registry.mark_unavailable("triton", f"not importable ({type(e).__name__}: {e})", TRITON_OPS)
    except Exception as e:  # noqa: BLE001 - a broken triton install must not take us down
        registry.mark_unavailable("triton", f"failed to load ({type(e).__name__}: {e})", TRITON_OPS)
        warnings.warn(f"kernels: triton backend not loaded ({type(e).__name__}: {e}); "
                      "using the torch reference", RuntimeWarning, stacklevel=2)


def rescan_plugins() -> None:
    """Look for `tokenspeed.kernels` entry points again before the next lookup."""
    registry.add_lazy_loader(plugins.load_plugins)


registry.add_lazy_loader(_load_triton_backend)
registry.add_lazy_loader(plugins.load_plugins)

__all__ = ["ClampedSwiGLU", "OPS", "REFERENCE_ONLY", "KernelError", "register", "unregister",
           "select", "selected_backend", "explain", "set_overrides", "overrides", "backends",
           "registered_ops", "rescan_plugins", "listing", "mark_unavailable", "unavailable"]
