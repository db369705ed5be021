"""Kernel variants first launched while serving: what start-up's batches did not reach.

Triton compiles a variant on its first launch, and the step that launches it waits, with every
request in it (a second or more for the attention and MoE kernels). Start-up compiles what its
CUDA graphs and warm-up batches launch (compile_ahead.py, warm_up.py); a load that reaches
another variant pays for it while serving. `LateCompiles`, installed as Triton's compile
hooks once start-up is done, counts those variants and the time they took (a compile, or a
load from Triton's disk cache), warns of each by kernel name and variant key (ranks log
warnings unless -v), and gives the totals to the engine's stats (`/metrics`:
tokenspeed_kernel_compiles_total, tokenspeed_kernel_compile_seconds_total).
"""
from __future__ import annotations

import logging
import threading
import time

from appliance.model.compile_hooks import CompileHooks, variant_of

log = logging.getLogger(__name__)


class LateCompiles(CompileHooks):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._started: dict[tuple, float] = {}   # variant -> when its compile began
        self.count = 0
        self.seconds = 0.0

    def before(self, *args, **kwargs) -> bool:
        with self._lock:
            self._started.setdefault(variant_of(args, kwargs), time.perf_counter())
        return False   # compile as usual

    def after(self, *args, **kwargs) -> None:
        variant = variant_of(args, kwargs)
        with self._lock:
            began = self._started.pop(variant, None)
            if began is None:
                return
            took = time.perf_counter() - began
            self.count += 1
            self.seconds += took
        log.warning("kernel %s: a variant first launched while serving took %.2f s to compile "
                    "(start-up's batches did not reach it); its key: %s",
                    variant[1], took, variant[2])

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"kernel_compiles_total": float(self.count),
                    "kernel_compile_seconds_total": self.seconds}
