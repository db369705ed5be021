"""Compile ahead: start-up's Triton kernels compiled while the weights load.

Triton compiles a kernel variant on its first launch. On a fresh machine that was most of the
8B preset's start-up: 47 s to ready on an H200, of which CUDA-graph capture took 20.5 s and
the warm-up 4.9 s, nearly all compiling, after a 6.4 s weight load. A variant depends on the
arguments' dtypes, shapes and alignment, never on their values, so start-up's batches run over
weights that are still loading compile the same variants. `CompileAhead` runs them beside the
load: the batch each CUDA graph is captured on (cuda_graph.py, extend_graph.py) and the eager
warm-up batches (warm_up.py), in a few threads, beside the load; the capture and warm-up then
find them compiled.

Where the time goes on a fresh machine (H200, Triton 3.6, 8B preset, dummy weights): 12.5-13.5
s for the 51 batches in 8 threads, about 15 compiles of ~1 s each. A compile mostly holds the
GIL (Triton's AST walk, MLIR and LLVM passes; only ptxas runs beside), so the threads overlap
them only ~1.5x; and every batch meets the variants it shares with the others in the same order,
each waiting for the one compile of it, so they form a chain. Tried and measured there, none
faster, so none kept: the variants compiled in 8 worker processes (no GIL: 22-24 s, the chain
then all latency); the variants first collected by capturing each batch into a dropped CUDA
graph with its Triton launches skipped, then compiled side by side in the workers (the 50
captures alone took 6-12 s, mostly Triton's launch path for an uncompiled variant, and the
batches after them 8-10 s more; 22-25 s); the host launchers built beside the compiles (9
distinct ones: 12.5 and 13.5 s against 12.8 s). Fewer variants: whether an attention launch
splits is a run-time branch, not a constexpr (19 -> 16 compiles; another H200 box, whose
compiles ran ~2x faster: 13 -> 10 compiles in the threads, 5.3 -> 5.2 s, the chain again;
there `tokenspeed up` answered in 11.9 s on a cold cache, twice). The box sets the time: a
third one, the daemon its first process (OS file cache cold too), compiled for 22.5 s and
answered after 31.8 s.

What it runs over: the parameters zeroed before the load writes them (finite values whatever
the load has reached: a router over them picks valid experts) and a scratch KV cache of a few
pages, bound to the layers until `join`. Every slot is -1 and every page-table entry page 0,
so nothing is written to the cache, and the outputs are dropped. All per-batch memory comes
from the caching allocator on the one stream, which orders the threads' kernels; no layer keeps
scratch between calls (kernels allocate their outputs). With tensor parallelism the batches run
in one thread, in the same order on every rank, so their collectives match.

Threads share the variants they need: left alone, each thread compiles its own copy of a
variant another is compiling (H200, 8B: 60 compiles and 54.6 s of compiling for 17 variants
and 10.6 s in one thread). `OneCompilePerVariant` makes the later ones wait for the first,
then load its result from Triton's on-disk cache (Triton's jit_cache_hook, 3.4 and later).

Triton builds each variant's host launcher (a small C extension module, the same module name
for every kernel) on its first launch; built by several threads at once, a kernel was seen to
get a launcher of another argument count (H200, Triton 3.6, a cold cache: "function takes
exactly 30 arguments (33 given)" from the sampler's kernel, which then failed every launch and
stopped the engine). `one_launcher_at_a_time` builds them one by one while the threads run.

A failure here (memory, say) is logged and left: the capture and warm-up after the load
compile what is missing, and report any real error themselves.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from appliance.model.batch import ForwardBatch
from appliance.model.compile_hooks import CompileHooks, variant_of
from appliance.model.cuda_graph import decode_buckets, decode_capture_batch
from appliance.model.extend_graph import extend_buckets, extend_capture_batch
from appliance.model.warm_up import warm_up_batches

log = logging.getLogger(__name__)

SCRATCH_PAGES = 4      # the batches read page 0 only
MAX_THREADS = 8        # H200 box: 16 cores; more threads mostly duplicate shared variants
MIN_FREE = 4 << 30     # GPU memory free beside the weights for one thread (compile_threads)
THREADS_MIN_FREE = 16 << 30   # ... and for MAX_THREADS


@dataclass(frozen=True)
class StartupShapes:
    """What start-up will run after the load (ModelRunner.from_config): CUDA graphs of
    decode steps up to `graph_rows` rows (0: none) and of extend steps up to
    `extend_tokens` tokens (0: none), over page tables `max_len` tokens wide; `hidden`: the
    graphs capture forward_hidden; then warm-up batches of up to `warm_up_tokens` tokens;
    `also`, callables of other start-up launches."""
    graph_rows: int
    extend_tokens: int
    max_len: int
    hidden: bool
    warm_up_tokens: int
    # more start-up launches to compile beside them (the engine's sampler warm-up)
    also: tuple[Callable[[], object], ...] = ()
    graph_logits: int = 0  # logits rows of the extend graphs (0: graph_rows)


Job = tuple[Callable[[ForwardBatch | None], object], Callable[[], ForwardBatch | None]]


def startup_jobs(model: nn.Module, shapes: StartupShapes, page_size: int,
                 device: torch.device) -> list[Job]:
    """(forward, batch maker) for every graph bucket's capture batch and every warm-up batch,
    and `also`'s callables (their batch None), interleaved (decode, extend, warm-up, also,
    decode, ...) so that concurrent threads start on different kernels."""
    max_pages = -(-shapes.max_len // page_size)
    graph_forward = model.forward_hidden if shapes.hidden else model
    decode = [(graph_forward, partial(decode_capture_batch, bs, max_pages, device))
              for bs in (decode_buckets(shapes.graph_rows) if shapes.graph_rows else ())]
    extend = [(graph_forward,
               partial(extend_capture_batch, t, shapes.graph_rows,
                       shapes.graph_logits or shapes.graph_rows, max_pages, device))
              for t in (extend_buckets(shapes.extend_tokens) if shapes.extend_tokens else ())]
    warm = [(model, lambda b=b: b) for b in
            warm_up_batches(shapes.warm_up_tokens, shapes.max_len, page_size, device)]
    also = [(_ignore_batch(fn), _no_batch) for fn in shapes.also]
    groups = [decode, extend, warm, also]
    return [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]


def _no_batch() -> None:
    return None


def _ignore_batch(fn: Callable[[], object]) -> Callable[[None], object]:
    return lambda _: fn()


class OneCompilePerVariant(CompileHooks):
    """Installed as Triton's compile hooks while the threads run: a thread about to compile a
    variant another thread is compiling waits until that one is done (then the compile it
    goes on to finds the variant in the on-disk cache)."""

    WAIT_S = 300.0   # a compile that raised never says it is done: waiters go on after this

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._compiling: dict[tuple, threading.Event] = {}

    def before(self, *args, **kwargs) -> bool:
        variant = variant_of(args, kwargs)
        with self._lock:
            first = variant not in self._compiling
            done = self._compiling.setdefault(variant, threading.Event())
        if not first:
            done.wait(self.WAIT_S)
        return False   # compile (or, after the wait, load from the disk cache)

    def after(self, *args, **kwargs) -> None:
        with self._lock:
            done = self._compiling.get(variant_of(args, kwargs))
        if done is not None:
            done.set()

    def remove(self) -> None:
        super().remove()
        with self._lock:
            for done in self._compiling.values():
                done.set()


@contextlib.contextmanager
def one_launcher_at_a_time(driver):
    """Within: Triton's `driver.launcher_cls` (what a kernel variant's first launch calls to
    build its host launcher) holds a lock, so launchers are built one by one (module doc)."""
    build, lock = driver.launcher_cls, threading.Lock()

    def locked(*args, **kwargs):
        with lock:
            return build(*args, **kwargs)

    driver.launcher_cls = locked
    try:
        yield
    finally:
        driver.launcher_cls = build


class CompileAhead:
    def __init__(self, model: nn.Module, kv_layers: list[nn.Module], kv_dtype: torch.dtype,
                 shapes: StartupShapes, page_size: int, device: torch.device,
                 threads: int) -> None:
        """Bind a scratch cache to `kv_layers` and start running start-up's batches over
        `model` in `threads` threads (returns at once; `join` waits)."""
        self.device, self.threads = device, max(1, threads)
        for layer in kv_layers:
            layer.bind_kv_cache(tuple(
                torch.zeros(SCRATCH_PAGES * page_size, *shape, dtype=kv_dtype, device=device)
                for shape in layer.kv_cache_shapes()))
        self.jobs = startup_jobs(model, shapes, page_size, device)
        self.completed, self.error = 0, None
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="compile-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        hooks = OneCompilePerVariant()
        serial = contextlib.nullcontext()
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                from triton.runtime import driver
                driver.active.get_current_device()   # Triton's driver set up once, not per thread
                hooks.install()
                serial = one_launcher_at_a_time(driver.active)
            with serial, ThreadPoolExecutor(self.threads,
                                            thread_name_prefix="compile-ahead") as pool:
                for _ in pool.map(self._run_job, self.jobs):
                    self.completed += 1
        except Exception as e:    # left to the capture and warm-up (module doc)
            self.error = e
        finally:
            hooks.remove()

    def _run_job(self, job: Job) -> None:
        forward, make_batch = job
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with torch.inference_mode():
            forward(make_batch())

    def join(self) -> str:
        """Wait for the batches and give their memory back (the scratch cache stays bound
        until the runner binds the real one); a summary."""
        self._thread.join()
        seconds = time.perf_counter() - self._started
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        if self.error is not None:
            log.warning("compiling ahead stopped after %d of %d batches (start-up compiles the "
                        "rest): %s: %s", self.completed, len(self.jobs),
                        type(self.error).__name__, self.error)
        return (f"{self.completed} of {len(self.jobs)} start-up batches in {seconds:.1f} s "
                f"({self.threads} thread{'s' * (self.threads > 1)}, beside the weights)")

    @property
    def ran_all(self) -> bool:
        return self.error is None and self.completed == len(self.jobs)


def compile_threads(tp_size: int, cpus: int, free_bytes: int) -> int:
    """One thread with tensor parallelism (collectives in one order on every rank); else half
    the cores, up to MAX_THREADS. Each thread's batches hold up to ~1 GB of activations (an
    8K-token prefill of the 8B) while the load may still need room for its own transients:
    one thread under THREADS_MIN_FREE free, none under MIN_FREE."""
    if free_bytes < MIN_FREE:
        return 0
    if tp_size > 1 or free_bytes < THREADS_MIN_FREE:
        return 1
    return max(1, min(MAX_THREADS, cpus // 2))
