"""Suite-wide fixtures."""
import sys

import pytest


@pytest.fixture(autouse=True)
def restore_kernel_overrides():
    """Every test starts with the kernel overrides the previous one found: a test (or an
    in-process engine) that calls `kernels.set_overrides` changes process-wide selection."""
    kernels = sys.modules.get("kernels")
    before = kernels.overrides() if kernels is not None else {}
    yield
    kernels = sys.modules.get("kernels")
    if kernels is not None and kernels.overrides() != before:
        kernels.set_overrides(before)
