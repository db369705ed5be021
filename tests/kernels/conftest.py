"""Kernel tests run Triton kernels through its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton decorates the kernels, so it is set here, before
any test module imports kernels.triton."""
import os

try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False

if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
