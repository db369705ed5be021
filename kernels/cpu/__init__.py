"""CPU backend "cpu" (priority 5): ops where plain torch on the CPU leaves speed behind for the
shapes a decode step has. Registered on import; serves only where `device` is "cpu"."""
from kernels.cpu import paged_attention  # noqa: F401  (registers decode / extend_attention)
from kernels.cpu import sample  # noqa: F401  (registers "sample")
from kernels.cpu import tuned_linear  # noqa: F401  (registers "linear")
