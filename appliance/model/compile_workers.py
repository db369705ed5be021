"""Triton kernel variants compiled in worker processes, into Triton's on-disk cache.

Compiling a Triton variant is mostly work that holds the GIL: the kernel's Python AST walked
into MLIR, then MLIR and LLVM passes (ptxas, a child process, is the part that runs beside).
Start-up's compile-ahead threads (compile_ahead.py) therefore compiled about one variant at a
time, however many threads there were (H200, 8B preset: 8 threads 11.8 s, 16 threads 11.1 s).
`CompileWorkers` hands each variant to one of a few `python -m appliance.model.compile_workers`
processes instead; the thread that asked waits (without the GIL) for the reply and then lets
Triton compile it in-process, which finds it in the on-disk cache and only loads it.

The request is Triton's own description of the variant, the `specialization_data` its compile
hook gets (Triton 3.4+; JSON: signature, constexprs, alignment attributes, options), and the
kernel's module and name. The worker rebuilds the variant's source from them and compiles it
for the GPU's target: no GPU needed there (the workers see none). A variant with the same
source, target, options and cache-relevant environment has the same cache key in either
process, so the in-process compile is a cache hit; if anything differs it simply compiles.
A worker's failure is only reported back: the in-process compile then does the work, and
raises any real error where it always did.
"""
from __future__ import annotations

import importlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]   # holds the appliance and kernels packages


@dataclass(frozen=True)
class Reply:
    seconds: float          # the worker's compile (or cache load) of the variant
    error: str | None       # why it could not (the in-process compile then does it)
    launcher: bool = False  # its host launcher built too (compile_variant)


class CompileWorkers:
    """`count` worker processes compiling for `target` (Triton's GPUTarget as a dict:
    backend, arch, warp_size). `submit(hook_kwargs)` queues the variant a Triton compile hook
    was called for and returns a future of the worker's `Reply`; safe from any thread."""

    def __init__(self, count: int, target: dict[str, Any]) -> None:
        self.target, self.count = target, max(1, count)
        self.started = time.perf_counter()
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get("PYTHONPATH")])))
        self._procs = [subprocess.Popen([sys.executable, "-m", "appliance.model.compile_workers"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                        text=True, bufsize=1)
                       for _ in range(self.count)]
        self._idle: queue.Queue[subprocess.Popen] = queue.Queue()
        for proc in self._procs:
            self._idle.put(proc)
        self._dispatch = ThreadPoolExecutor(self.count, thread_name_prefix="compile-worker")
        self._lock = threading.Lock()
        self.compiled, self.launchers, self.seconds, self.errors = 0, 0, 0.0, []
        self.span: tuple[float, float] | None = None   # first compile's start, last one's end

    def submit(self, hook_kwargs: dict[str, Any]) -> Future[Reply]:
        """Queue the variant of this compile-hook call (`fn`, `compile`) for a worker."""
        request = variant_request(hook_kwargs, self.target)
        if request is None:
            done: Future[Reply] = Future()
            done.set_result(Reply(0.0, "this Triton's compile hook does not describe the variant"))
            return done
        return self._dispatch.submit(self._compile, request)

    def compile(self, hook_kwargs: dict[str, Any]) -> Reply:
        """submit, and wait for the reply."""
        return self.submit(hook_kwargs).result()

    def _compile(self, request: dict) -> Reply:
        proc = self._idle.get()
        started = time.perf_counter() - self.started
        try:
            reply = _exchange(proc, request)
        finally:
            self._idle.put(proc)
        with self._lock:
            ended = time.perf_counter() - self.started
            self.span = (min(started, self.span[0]), ended) if self.span else (started, ended)
            if reply.error is None:
                self.compiled, self.seconds = self.compiled + 1, self.seconds + reply.seconds
                self.launchers += reply.launcher
            else:
                self.errors.append(f"{request['kernel']}: {reply.error}")
        return reply

    def summary(self) -> str:
        text = (f"{self.compiled} variants ({self.launchers} with their launchers) compiled "
                f"in {len(self._procs)} worker processes, {self.seconds:.1f} s summed")
        if self.span:
            text += f", from {self.span[0]:.1f} to {self.span[1]:.1f} s"
        if self.errors:
            text += f"; {len(self.errors)} left to this process (first: {self.errors[0]})"
        return text

    def close(self) -> None:
        """Wait for the queued compiles, then end the workers (each exits when its input
        closes)."""
        self._dispatch.shutdown(wait=True)
        for proc in self._procs:
            try:
                proc.stdin.close()
                proc.wait(5)
            except Exception:   # noqa: BLE001 - a stuck or dead worker is killed instead
                proc.kill()


def variant_request(hook_kwargs: dict[str, Any], target: dict[str, Any]) -> dict | None:
    """What a worker needs to compile the variant of a compile-hook call, or None where this
    Triton's hook does not pass it (`fn` with module and name, `compile` with the JSON)."""
    fn, details = hook_kwargs.get("fn"), hook_kwargs.get("compile")
    data = details.get("specialization_data") if isinstance(details, dict) else None
    if fn is None or data is None or not getattr(fn, "module", None):
        return None
    return {"kernel": f"{fn.module}:{fn.name}", "specialization": data, "target": target}


def _exchange(proc: subprocess.Popen, request: dict) -> Reply:
    try:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
    except (OSError, ValueError) as e:   # a dead worker: broken pipe or closed file
        return Reply(0.0, f"worker gone ({type(e).__name__}: {e})")
    if not line:
        return Reply(0.0, f"worker exited (code {proc.poll()})")
    answer = json.loads(line)
    return Reply(float(answer.get("seconds", 0.0)), answer.get("error"),
                 bool(answer.get("launcher")))


# --- the worker process -----------------------------------------------------------------


def jit_function(kernel: str):
    """'module:qualname' -> the kernel's JITFunction (under any autotune/heuristics wrapper)."""
    from triton.runtime.jit import JITFunction
    module, _, qualname = kernel.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        raise TypeError(f"{kernel} is not a Triton kernel")
    return obj


def _tuples(value: Any) -> Any:
    """JSON's lists back to the tuples Triton serialized (lists are never kernel arguments)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _constant(value: Any) -> Any:
    """A constexpr as Triton's specialization data writes it -> its value."""
    import triton.language as tl
    if isinstance(value, str) and tl.dtype.is_dtype(value):
        return tl.dtype(value)
    if isinstance(value, dict) and "constexpr" in value:
        return tl.constexpr(_tuples(value["constexpr"]))
    if isinstance(value, dict) and "jit_function" in value:
        return jit_function(value["jit_function"])
    return _tuples(value)


def compile_variant(kernel: str, specialization: str, target: dict[str, Any]) -> bool:
    """Compile one variant, and its host launcher where there is one to build, into Triton's
    cache (cache hits if they are there already); whether a launcher was built."""
    return build_launcher(compiled_variant(kernel, specialization, target))


def compiled_variant(kernel: str, specialization: str, target: dict[str, Any]):
    """The variant Triton's specialization data describes, compiled (a CompiledKernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = jit_function(kernel)
    data = json.loads(specialization)
    constexprs = {tuple(k): _constant(v)
                  for k, v in zip(data["constant_keys"], data["constant_vals"])}
    attrs = {tuple(k): v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
    signature = {k: _tuples(v) for k, v in data["signature"].items()}
    # as Triton's own preload: top-level lists back to tuples (the cache key hashes the text)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget(**data.get("target", target)),
                          options=options)


def launcher_source(kernel) -> str | None:
    """The C source of a compiled variant's host launcher as this Triton's CudaLauncher makes
    it, or None where it makes none (one launcher for every kernel: 3.7 and later)."""
    try:
        from triton.backends.nvidia import driver as cuda
    except ImportError:
        return None
    if not hasattr(cuda, "make_launcher"):
        return None
    names = kernel.src.fn.arg_names
    constants = {((names.index(k),) if isinstance(k, str) else k): v
                 for k, v in kernel.src.constants.items()}
    return cuda.make_launcher(constants, dict(kernel.src.signature),
                              getattr(kernel.metadata, "tensordesc_meta", None))


def build_launcher(kernel) -> bool:
    """Build the variant's host launcher into Triton's cache where this Triton builds one per
    signature (3.5-3.6: a C extension, compiled by the system's C compiler on the first launch;
    in the asking process those builds ran one at a time, see compile_ahead.py); the same
    source as its CudaLauncher makes, so that one is a cache hit. False where there is none to
    build (a Triton with one launcher for every kernel) or no CUDA driver library to link."""
    source = launcher_source(kernel)
    if source is None:
        return False
    from triton.backends.nvidia import driver as cuda
    try:
        cuda.compile_module_from_src(src=source, name="__triton_launcher",
                                     library_dirs=cuda.library_dirs(),
                                     include_dirs=cuda.include_dirs, libraries=cuda.libraries)
    except Exception:   # noqa: BLE001 - no libcuda here: the launch builds it as before
        return False
    return True


def serve(requests: IO[str], replies: IO[str]) -> None:
    """Answer each request line with a reply line until the input closes."""
    for line in requests:
        request = json.loads(line)
        started = time.perf_counter()
        try:
            launcher = compile_variant(request["kernel"], request["specialization"],
                                       request["target"])
            reply = {"seconds": time.perf_counter() - started, "launcher": launcher}
        except Exception as e:   # noqa: BLE001 - reported; the asking process compiles it
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())   # stray prints must not corrupt replies
    import kernels.triton  # noqa: F401  (torch and every kernel module, before the first request)
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
