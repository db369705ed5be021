"""Triton's compile hooks as a class to subclass.

Triton 3.4+ calls `knobs.runtime.jit_cache_hook` when a launch finds no loaded variant of its
kernel (it then compiles it, or loads it from the on-disk cache) and
`knobs.runtime.jit_post_compile_hook` once that is done, each with the kernel (`fn`) and the
variant's `key`. `CompileHooks.install` makes a subclass's `before` and `after` those hooks
and `remove` puts back what was there (compile_ahead.py, late_compiles.py).
"""
from __future__ import annotations


def triton_runtime_knobs():
    """triton.knobs.runtime where it has the compile hooks (Triton 3.4+), else None."""
    try:
        from triton import knobs
    except ImportError:
        return None
    runtime = getattr(knobs, "runtime", None)
    return runtime if hasattr(runtime, "jit_cache_hook") else None


def variant_of(args: tuple, kwargs: dict) -> tuple:
    """(module, kernel name, variant key) of a hook call."""
    if "fn" not in kwargs:     # a Triton that passes them positionally: key first
        return (None, None, *map(str, args[:1]))
    fn = kwargs["fn"]
    return getattr(fn, "module", None), getattr(fn, "name", None), str(kwargs.get("key"))


class CompileHooks:
    def __init__(self) -> None:
        self._saved: tuple | None = None

    def before(self, *args, **kwargs) -> bool:
        """A variant is about to be compiled; True would tell Triton to skip it."""
        return False

    def after(self, *args, **kwargs) -> None:
        """That variant is compiled (or loaded from the disk cache)."""

    def install(self) -> bool:
        """Become Triton's compile hooks (False where this Triton has none)."""
        runtime = triton_runtime_knobs()
        if runtime is None:
            return False
        self._saved = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = self.before, self.after
        return True

    def remove(self) -> None:
        runtime = triton_runtime_knobs()
        if runtime is not None and self._saved is not None:
            runtime.jit_cache_hook, runtime.jit_post_compile_hook = self._saved
            self._saved = None
