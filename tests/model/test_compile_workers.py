"""Triton variants compiled in worker processes (appliance/model/compile_workers.py), through
the real path on the CPU: a kernel launched for warm-up (compiled, not run) against a stand-in
driver that reports an H200 (sm_90), with compile-ahead's hooks installed. A worker must
compile the variant and Triton's own compile must then find it in the on-disk cache. Each
check runs in a subprocess without TRITON_INTERPRET, so the kernels are real JIT functions."""
import contextlib
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

try:
    import triton.backends.nvidia.compiler as _nv
    _nv.get_ptxas(90).path  # noqa: B018 - raises when the bundled ptxas is missing
except Exception as e:  # noqa: BLE001
    pytest.skip(f"triton's CUDA backend/ptxas unavailable: {e}", allow_module_level=True)

from appliance.model.compile_hooks import triton_runtime_knobs  # noqa: E402

if triton_runtime_knobs() is None:
    pytest.skip("this Triton has no compile hooks (3.4+)", allow_module_level=True)

pytestmark = pytest.mark.slow  # spawns processes: skipped by -m 'not slow'

SM90 = {"backend": "cuda", "arch": 90, "warp_size": 32}


@pytest.mark.parametrize("check", ["workers_fill_the_cache", "failures_are_reported",
                                   "launcher_sources_match"])
def test_in_a_subprocess(check, tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, here, env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    res = subprocess.run([sys.executable, "-c", f"import test_compile_workers as t; t.{check}()"],
                         cwd=here, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def hopper_driver() -> None:
    """Make Triton's active driver one that reports device 0 of an sm_90 GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Hopper:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget(**SM90)

    driver.set_active(Hopper())


def cache_hits() -> list[bool]:
    """Whether each in-process compile from now on was a cache hit."""
    hits = []
    triton.knobs.compilation.listener = lambda **k: hits.append(k["cache_hit"])
    return hits


def launch_as_on_an_h200() -> None:
    """Two kernels through their real wrappers, as an H200 launches them (PDL on): RMSNorm
    and the GEMV (inline asm). The stand-in driver cannot run a kernel, so a launch that is
    not skipped fails after its compile."""
    import torch

    from kernels.triton import elementwise as E
    from kernels.triton import gemv as G
    for module in (E, G):
        module.pdl_launch = lambda device: {"PDL": True, "launch_pdl": True}
    x, w = torch.zeros(1, 256, dtype=torch.bfloat16), torch.zeros(512, 256, dtype=torch.bfloat16)
    for launch in (lambda: E.rms_norm(x, w[0], 1e-6), lambda: G.gemv(x, w)):
        with contextlib.suppress(AttributeError):   # the stand-in driver has no launcher
            launch()


def workers_fill_the_cache() -> None:
    """Collecting, the launches only hand their variants over (nothing compiles or launches
    here); launched after that, each variant is a cache hit, compiled once by a worker."""
    from appliance.model.compile_ahead import CompileInWorkers
    from appliance.model.compile_workers import CompileWorkers
    hopper_driver()
    workers = CompileWorkers(2, SM90)
    hooks = CompileInWorkers(workers)
    assert hooks.install()
    hits = cache_hits()
    try:
        with hooks.collecting():
            launch_as_on_an_h200()
        assert hits == [] and workers.compiled + len(workers.errors) <= 2
        launch_as_on_an_h200()
    finally:
        hooks.remove()
        workers.close()
    assert workers.errors == [], workers.errors
    assert workers.compiled == 2 and workers.seconds > 0, workers.summary()
    assert hits == [True, True], hits          # Triton's own compiles only loaded them
    assert all(p.poll() == 0 for p in workers._procs)   # closed: each exited cleanly


def failures_are_reported() -> None:
    """A worker that cannot compile, or is gone, says so; the caller then compiles itself."""
    from appliance.model.compile_workers import CompileWorkers, variant_request
    assert variant_request({"key": "k"}, SM90) is None           # a hook call without the data

    class Fn:
        module, name = "kernels.triton.elementwise", "no_such_kernel"

    workers = CompileWorkers(1, SM90)
    try:
        reply = workers.compile({"fn": Fn(), "compile": {"specialization_data": "{}"}})
        assert reply.error and "no_such_kernel" in reply.error, reply
        workers._procs[0].kill()
        workers._procs[0].wait()
        Fn.name = "_rms_norm_kernel"
        reply = workers.compile({"fn": Fn(), "compile": {"specialization_data": "{}"}})
        assert reply.error and "worker" in reply.error, reply
    finally:
        workers.close()
    assert workers.compiled == 0 and len(workers.errors) == 2
    assert "left to this process" in workers.summary()


def launcher_sources_match() -> None:
    """Where Triton builds a host launcher per signature (3.5-3.6), the one a worker builds
    has the C source the launch's own CudaLauncher makes (so the launch's is a cache hit)."""
    from appliance.model.compile_workers import compiled_variant, launcher_source
    hopper_driver()
    asked = []
    triton.knobs.runtime.jit_cache_hook = lambda **k: asked.append(k) and False
    launch_as_on_an_h200()
    from kernels.triton import elementwise as E
    from kernels.triton import gemv as G
    for fn, kwargs in zip((E._rms_norm_kernel, G._gemv_kernel), asked, strict=True):
        launched = next(iter(fn.device_caches[0][0].values()))
        mine = compiled_variant(f"{kwargs['fn'].module}:{kwargs['fn'].name}",
                                kwargs["compile"]["specialization_data"], SM90)
        source = launcher_source(mine)
        from appliance.model import triton_launchers
        assert triton_launchers.launcher_source(kwargs["compile"]["signature"]) == source
        if source is None:
            print("this Triton builds no launcher per signature")
            return
        from triton.backends.nvidia import driver as cuda
        made = []

        def record(src, **_):
            made.append(src)
            raise RuntimeError("recorded")

        cuda.compile_module_from_src = record
        cuda.library_dirs = lambda: []           # no libcuda to find on a CPU box
        with contextlib.suppress(RuntimeError):
            cuda.CudaLauncher(launched.src, launched.metadata)
        assert made == [source]
