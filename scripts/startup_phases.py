"""Where an engine rank's start-up goes, phase by phase, in one process on this machine.

The phases of appliance/engine/rank.py's run_rank up to the model runner, timed one after the
other: imports (torch, triton, the appliance's modules), the CUDA context, the grammar compiler's
start, then ModelRunner construction (the load and the KV cache; no graphs, no warm-up)
under cProfile (its top functions by cumulative time). With --compile N1 N2 ..., then, each in
a fresh process over an empty Triton cache: start-up's batches compiled ahead
(appliance/model/compile_ahead.py) in N threads, with the count and summed time of the Triton
compiles (triton.compiler.compile timed: compile-ahead holds Triton's compile hooks). With
--warm-profile, then: a restart's share, over the Triton cache such a run filled: start-up's
batches one by one in one thread, then the CUDA-graph capture, each under cProfile. With
--list, first compile-ahead in one thread with every compile listed: seconds, kernel, constexprs.

    python scripts/startup_phases.py [-c configs/llama-3.1-8b.yaml] [--compile 1 8] [--list]
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def phase(name: str, since: list[float]) -> None:
    now = time.perf_counter()
    print(f"{name:<34} {now - since[0]:7.2f} s", flush=True)
    since[0] = now


def rank_phases(config_path: str) -> None:
    since = [STARTED]
    import torch
    phase("import torch", since)
    import triton  # noqa: F401
    phase("import triton", since)
    import kernels  # noqa: F401
    from appliance.engine import engine, rank  # noqa: F401
    from appliance.model import runner  # noqa: F401
    phase("import appliance (rank, engine, runner)", since)
    from appliance.config import load_config
    from appliance.engine.model_files import resolve_model_files
    config = load_config(config_path)
    files = resolve_model_files(config)
    phase("config and model files", since)
    device = rank.resolve_device(config.device, 0)
    torch.zeros(1, device=device)
    phase("CUDA context", since)
    compiler = rank._start_grammar_compiler(files, *rank._vocabulary(config, files))
    phase("grammar compiler started", since)
    profiler = cProfile.Profile()
    profiler.enable()
    built = runner.ModelRunner(runner.model_source(config, files), device,
                               rank.resolve_dtype(config.model.dtype, device),
                               kv_num_pages=config.kv.num_pages,
                               memory_fraction=config.kv.memory_fraction,
                               page_size=config.kv.page_size,
                               kv_dtype=runner.KV_DTYPES[config.kv.dtype])
    profiler.disable()
    phase("ModelRunner (load, KV cache)", since)
    if device.type == "cuda":
        torch.cuda.synchronize()
        phase("... its GPU work done", since)
    del built, compiler
    if device.type == "cuda":   # the child processes below need the KV cache's memory back
        torch.cuda.empty_cache()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
    print(text.getvalue()[-6000:])


# Both child processes: the config's model with dummy weights, and its start-up shapes.
RUNNER = """
import sys, threading, time
sys.path.insert(0, {root!r})
import torch, triton
from appliance.model import ModelRunner, ModelSource
from appliance.model.runner import startup_shapes
from appliance.config import load_config
config = load_config({config!r})
source = ModelSource(preset=config.model.preset, load_format="dummy")
runner = ModelRunner(source, device="cuda", dtype=torch.bfloat16, kv_num_pages=64)
max_len = min(config.model.max_model_len, runner.max_model_len)
shapes = startup_shapes(config, max_len, True)
"""

COMPILE = RUNNER + """
import triton.compiler
from appliance.model.compile_ahead import CompileAhead
# compile-ahead installs its own compile hooks, so time triton.compiler.compile itself (a
# launch's binder takes it from there); a variant another thread compiled comes back from the
# disk cache through it too, in well under COMPILED_S
COMPILED_S = 0.2
spans, compile_ = [], triton.compiler.compile
def timed_compile(src, *a, **k):
    started = time.perf_counter()
    try:
        return compile_(src, *a, **k)
    finally:   # the seconds, the kernel and its scalar constexprs by name
        names = getattr(getattr(src, "fn", None), "arg_names", [])
        consts = {{names[i[0]] if names and len(i) == 1 else i: v
                   for i, v in getattr(src, "constants", {{}}).items()
                   if isinstance(v, (int, float, bool, str))}}
        spans.append((time.perf_counter() - started, getattr(src, "name", "?"), consts))
triton.compiler.compile = timed_compile
t = time.perf_counter()
ahead = CompileAhead(runner.model, runner._kv_layers, runner.kv_dtype, shapes, runner.page_size,
                     runner.device, {threads})
summary = ahead.join()
built = [x for x in spans if x[0] >= COMPILED_S]
print(f"threads {threads}: {{time.perf_counter() - t:.1f}} s wall; {{len(built)}} compiles, "
      f"{{sum(x[0] for x in built):.1f}} s summed ({{len(spans) - len(built)}} more variants "
      f"loaded); {{summary}}")
if {listed}:   # in the order they were compiled
    for secs, name, consts in built:
        print(f"  {{secs:6.2f}} s  {{name}}  {{consts}}")
"""


WARM = RUNNER + """
import cProfile, io, pstats
from appliance.model.compile_ahead import startup_jobs
from appliance.model.runner import graph_size
compiles = []
triton.knobs.runtime.jit_post_compile_hook = lambda *a, **k: compiles.append(1)
def profiled(name, fn):
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    print(f"== {{name}}: {{time.perf_counter() - t:.2f}} s, {{len(compiles)}} compiles", flush=True)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
    print(text.getvalue()[-5000:], flush=True)
    compiles.clear()
def jobs():
    for i, (forward, make) in enumerate(startup_jobs(runner.model, shapes, runner.page_size,
                                                     runner.device)):
        t = time.perf_counter()
        forward(make())
        torch.cuda.synchronize()
        print(f"job {{i}}: {{time.perf_counter() - t:.3f}} s", flush=True)
profiled("start-up batches, one thread", jobs)
rows, logits = graph_size(config)
profiled("CUDA graphs", lambda: runner.enable_cuda_graphs(
    rows, max_len, max_extend_tokens=int(config.scheduler.max_batch_tokens), max_logits=logits))
"""


def warm_profile(config_path: str) -> None:
    """Start-up's batches in one thread, then the CUDA-graph capture, under cProfile, over a
    Triton cache a compile-ahead run has just filled: what a restart spends beside compiling."""
    with tempfile.TemporaryDirectory() as cache:
        run_child(COMPILE.format(root=str(ROOT), config=config_path, threads=8, listed=False),
                  cache)
        run_child(WARM.format(root=str(ROOT), config=config_path), cache)


def compile_runs(config_path: str, threads: list[int], listed: bool = False) -> None:
    """Compile-ahead in each thread count over an empty Triton cache; listed: each compile's
    seconds, kernel and constexprs too."""
    for n in threads:
        with tempfile.TemporaryDirectory() as cache:
            run_child(COMPILE.format(root=str(ROOT), config=config_path, threads=n,
                                     listed=listed), cache)


def run_child(code: str, triton_cache: str) -> None:
    """`code` in a fresh Python over `triton_cache`; its output (or its error's tail)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TRITON_CACHE_DIR": triton_cache}, timeout=400)
    print(out.stdout.strip() or out.stderr[-3000:], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default="configs/llama-3.1-8b.yaml")
    parser.add_argument("--compile", type=int, nargs="*", default=[])
    parser.add_argument("--warm-profile", action="store_true",
                        help="then profile a restart's batches and graph capture (warm_profile)")
    parser.add_argument("--list", action="store_true",
                        help="then compile ahead in one thread, listing every compile")
    args = parser.parse_args()
    rank_phases(args.config)
    if args.list:
        compile_runs(args.config, [1], listed=True)
    if args.compile:
        compile_runs(args.config, args.compile)
    if args.warm_profile:
        warm_profile(args.config)


if __name__ == "__main__":
    main()
