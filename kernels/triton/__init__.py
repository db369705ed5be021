"""Triton backend (priority 10, CUDA only). Importing this package registers every op.

Kernels also run on CPU through Triton's interpreter (TRITON_INTERPRET=1), which the tests use;
the registry never selects them for a CPU device.

FP fusion (a * b + c contracted to one FMA) stays on: the kernels were tuned and checked with
it, Triton's default through 3.9; 3.10 turns that default off (3.9 warns so). A user's own
TRITON_DEFAULT_FP_FUSION is left as it is."""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from kernels.triton import attention_ops  # noqa: F401,E402
from kernels.triton import elementwise, gemv, head_gemv, rope_kv  # noqa: F401,E402
from kernels.triton import mla_absorb_rope  # noqa: F401,E402
from kernels.triton import moe, penalties, route  # noqa: F401,E402
from kernels.triton import sample  # noqa: F401,E402
from kernels.triton import spec_accept  # noqa: F401,E402
