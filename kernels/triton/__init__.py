"""Triton backend (priority 10, CUDA only). Importing this package registers every op.

Kernels also run on CPU through Triton's interpreter (TRITON_INTERPRET=1), which the tests use;
the registry never selects them for a CPU device."""
from kernels.triton import attention_ops  # noqa: F401
from kernels.triton import elementwise, gemv, rope_kv  # noqa: F401,E402
from kernels.triton import moe, route  # noqa: F401,E402
from kernels.triton import sample  # noqa: F401,E402
from kernels.triton import spec_accept  # noqa: F401,E402
