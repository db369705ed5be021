"""Triton's per-signature host launchers at start-up: built side by side, loaded one at a time.

Triton 3.5-3.6 launch a kernel variant through a small C extension module made for its
argument types (the backend's `make_launcher`), compiled by the system's C compiler on the
variant's first launch and kept in Triton's cache; later Tritons have one launcher for every
kernel and build nothing. Every such module has the same name, and built by several threads at
once one kernel was seen to get a launcher of another argument count (H200, Triton 3.6, a cold
cache: "function takes exactly 30 arguments (33 given)" from the sampler's kernel, which then
failed every launch and stopped the engine). Start-up's compile-ahead built them one at a time
for that; with ~20 variants at ~0.6 s of C compiler each, that queue was itself seconds.

`loads_one_at_a_time` keeps only the module loads in one queue (the step that hands a module
named `__triton_launcher` to Python's import machinery), and `LauncherBuilds` starts the C
compile of a variant's launcher as soon as its kernel starts compiling, in a thread of its own
(the compiler is a child process), so the launch that follows finds it in the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sysconfig
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

NAME = "__triton_launcher"


def _cuda_driver():
    """Triton's CUDA driver module where it builds launchers per signature, else None."""
    try:
        from triton.backends.nvidia import driver as cuda
        from triton.runtime import build
    except ImportError:
        return None
    needed = (hasattr(cuda, "make_launcher") and hasattr(build, "_load_module_from_path")
              and hasattr(build, "_build") and hasattr(build, "platform_key"))
    return cuda if needed else None


@contextlib.contextmanager
def loads_one_at_a_time() -> Iterator[None]:
    """Within: Triton loads one built launcher module at a time (a no-op where it builds
    none)."""
    if _cuda_driver() is None:
        yield
        return
    from triton.runtime import build
    load, lock = build._load_module_from_path, threading.Lock()

    def locked(*args, **kwargs):
        with lock:
            return load(*args, **kwargs)

    build._load_module_from_path = locked
    try:
        yield
    finally:
        build._load_module_from_path = load


def launcher_source(signature: dict) -> str | None:
    """The C source of the launcher for a variant of this signature (argument name -> Triton
    type, "constexpr" included, as Triton's compile hook gets it), or None where this Triton
    builds none. The source depends on the argument types only (not on the constexprs)."""
    cuda = _cuda_driver()
    return None if cuda is None else cuda.make_launcher({}, dict(signature), None)


def build_launcher(source: str) -> bool:
    """Compile the launcher `source` into Triton's cache as its launch would, without loading
    it; False if it was there already."""
    cuda = _cuda_driver()
    from triton.runtime import build
    from triton.runtime.cache import get_cache_manager
    key = hashlib.sha256((source + build.platform_key()).encode("utf-8")).hexdigest()
    cache = get_cache_manager(key)
    filename = NAME + sysconfig.get_config_var("EXT_SUFFIX")
    if cache.get_file(filename) is not None:
        return False
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, NAME + ".c")
        with open(path, "w") as f:
            f.write(source)
        built = build._build(NAME, path, scratch, cuda.library_dirs(), cuda.include_dirs,
                             cuda.libraries, [])
        with open(built, "rb") as f:
            cache.put(f.read(), filename, binary=True)
    return True


class LauncherBuilds:
    """Launchers built in `threads` threads, one per distinct source, started by `start`."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="triton-launcher")
        self._lock = threading.Lock()
        self._sources: set[str] = set()
        self.built, self.errors = 0, []

    def start(self, signature: dict) -> None:
        """Start building the launcher of a variant of this signature (once per source)."""
        source = launcher_source(signature)
        with self._lock:
            if source is None or source in self._sources:
                return
            self._sources.add(source)
        self._pool.submit(self._build, source)

    def _build(self, source: str) -> None:
        try:
            built = build_launcher(source)
        except Exception as e:   # noqa: BLE001 - the launch builds it itself, and reports
            with self._lock:
                self.errors.append(f"{type(e).__name__}: {e}")
            return
        with self._lock:
            self.built += built

    def close(self) -> None:
        self._pool.shutdown(wait=True)
