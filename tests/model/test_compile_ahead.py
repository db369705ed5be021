"""Compiling ahead (appliance/model/compile_ahead.py) on the CPU: the jobs are every CUDA
graph's capture batch and every warm-up batch, and running them in threads over a model
leaves it exact (its cache unwritten, HF's greedy tokens). That the capture then compiles
nothing is checked on CUDA: tests/model/test_llama_cuda.py."""
from __future__ import annotations

from dataclasses import replace

import torch

from appliance.config import load_config
from appliance.model import ModelRunner
from appliance.model.compile_ahead import CompileAhead, StartupShapes, compile_threads, startup_jobs
from appliance.model.extend_graph import graph_logits
from appliance.model.runner import startup_shapes
from appliance.model.tiny import ensure_tiny_checkpoint
from appliance.model.warm_up import warm_up_batches
from helpers import greedy_generate, hf_greedy

PS = 4
SHAPES = StartupShapes(graph_rows=6, extend_tokens=40, max_len=200, hidden=False,
                       warm_up_tokens=80)


def tiny_runner(tmp_path) -> tuple[ModelRunner, str]:
    folder = str(ensure_tiny_checkpoint(tmp_path / "tiny"))
    return ModelRunner(folder, kv_num_pages=64, page_size=PS), folder


def test_the_jobs_are_every_graph_capture_batch_and_warm_up_batch(tmp_path):
    runner, _ = tiny_runner(tmp_path)
    jobs = startup_jobs(runner.model, SHAPES, PS, torch.device("cpu"))
    batches = [make() for _, make in jobs]
    assert None not in batches                                      # no `also` callables
    decode = [b for b in batches if b.num_decode == b.num_rows == b.num_tokens and b.num_rows > 0
              and not b.graph_bucket and bool((b.seq_lens == 1).all())]
    extend = [b for b in batches if b.graph_bucket]
    warm = warm_up_batches(80, 200, PS, torch.device("cpu"))
    assert [b.num_rows for b in decode] == [1, 2, 4, 6]            # buckets up to graph_rows
    assert [b.num_tokens for b in extend] == [8, 16, 32, 40]       # ... and to extend_tokens
    assert len(batches) == len(decode) + len(extend) + len(warm)
    assert {b.page_table.shape[1] for b in decode + extend} == {50}  # max_len / page size
    assert all(b.num_rows == min(b.num_tokens, 7) for b in extend)   # rows + the padding row
    assert all(b.num_logits == min(b.num_tokens, 6) for b in extend)  # graph_logits 0: rows
    more = startup_jobs(runner.model, replace(SHAPES, graph_logits=20), PS, torch.device("cpu"))
    assert [b.num_logits for b in (make() for _, make in more) if b.graph_bucket] == [8, 16, 20, 20]
    assert [b.num_tokens for b in batches[:3]] == [1, 8, warm[0].num_tokens]  # interleaved
    for b in batches:
        b.validate()
        assert bool((b.slot_mapping == -1).all()) and not b.page_table.any()   # writes nothing


def test_running_them_in_threads_leaves_the_model_exact(tmp_path):
    from appliance.engine.sampler import Sampler

    runner, folder = tiny_runner(tmp_path)
    caches = list(runner.kv_caches)
    sampled = []
    launch = Sampler(torch.device("cpu"), runner.vocab_size).warm_up_launch(runner.vocab_size)
    shapes = replace(SHAPES, also=(lambda: sampled.append(launch()),))
    ahead = CompileAhead(runner.model, runner._kv_layers, runner.kv_dtype, shapes, PS,
                         torch.device("cpu"), threads=2)
    summary = ahead.join()
    assert ahead.ran_all and summary.startswith(f"{len(ahead.jobs)} of {len(ahead.jobs)} ")
    assert len(sampled) == 1 and sampled[0].shape == (2,)          # `also` ran too
    for layer, cache in zip(runner._kv_layers, caches):
        layer.bind_kv_cache(cache)
    assert all(not c.any() for layer in caches for c in layer)
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4, 8]]
    assert greedy_generate(runner, prompts, 4) == hf_greedy(folder, prompts, 4)


def test_a_failing_batch_is_left_to_start_up(tmp_path):
    runner, _ = tiny_runner(tmp_path)

    class Boom(torch.nn.Module):
        def forward(self, batch):
            raise RuntimeError("out of memory, say")

    ahead = CompileAhead(Boom(), runner._kv_layers, runner.kv_dtype, SHAPES, PS,
                         torch.device("cpu"), threads=2)
    summary = ahead.join()
    assert not ahead.ran_all and isinstance(ahead.error, RuntimeError)
    assert summary.startswith("0 of ")


def test_startup_shapes_follow_the_config(monkeypatch):
    config = load_config(None)
    shapes = startup_shapes(config, 4096, graphs=True)
    assert shapes.graph_rows == min(config.scheduler.max_running, 256)
    assert shapes.extend_tokens == min(config.scheduler.max_batch_tokens, 2048)
    assert shapes.warm_up_tokens == config.scheduler.max_batch_tokens and shapes.max_len == 4096
    assert startup_shapes(config, 4096, graphs=False).graph_rows == 0
    assert shapes.graph_logits == shapes.graph_rows                  # speculation off
    spec = load_config(None, ["speculative.method=suffix", "speculative.max_draft=4"])
    rows = min(spec.scheduler.max_running, 256)
    assert startup_shapes(spec, 4096, graphs=True).graph_logits == graph_logits(rows, 4) > rows
    monkeypatch.setenv("TOKENSPEED_COMPILE_AHEAD", "0")
    assert startup_shapes(config, 4096, graphs=True) is None
    big, tight, none = 100 << 30, 8 << 30, 2 << 30
    assert compile_threads(1, 16, big) == 8 and compile_threads(1, 2, big) == 1
    assert compile_threads(2, 64, big) == 1                    # TP: one order on every rank
    assert compile_threads(1, 16, tight) == 1 and compile_threads(1, 16, none) == 0


def test_a_variant_another_thread_compiles_is_waited_for_not_compiled_again():
    import threading
    import time

    from appliance.model.compile_ahead import OneCompilePerVariant

    hooks, spans, lock = OneCompilePerVariant(), {}, threading.Lock()

    class Kernel:
        module, name = "kernels.triton.x", "_k"

    def compile_variant(i: int, key: str) -> None:
        assert hooks.before(key=key, fn=Kernel) is False          # Triton then compiles
        begin = time.perf_counter()
        time.sleep(0.3)
        with lock:
            spans[i] = (begin, time.perf_counter())
        hooks.after(key=key, fn=Kernel)

    threads = [threading.Thread(target=compile_variant, args=(i, key))
               for i, key in enumerate(["a", "a", "b"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a1, a2), b = sorted([spans[0], spans[1]]), spans[2]
    assert a2[0] >= a1[1]                  # the second "a" began once the first had ended
    assert b[0] < a1[1]                    # "b" did not wait for "a"



def test_launchers_are_built_one_at_a_time_and_the_driver_restored():
    """Within one_launcher_at_a_time, 8 threads building Triton launchers at once build them
    one by one (none overlaps another); after it, the driver's own launcher class is back."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from appliance.model.compile_ahead import one_launcher_at_a_time

    inside, most = [0], [0]
    count = threading.Lock()

    def build(src, metadata):
        with count:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.01)
        with count:
            inside[0] -= 1
        return (src, metadata)

    class Driver:
        launcher_cls = staticmethod(build)

    driver = Driver()
    with one_launcher_at_a_time(driver):
        with ThreadPoolExecutor(8) as pool:
            built = list(pool.map(lambda i: driver.launcher_cls(i, "meta"), range(16)))
    assert built == [(i, "meta") for i in range(16)] and most[0] == 1
    assert driver.launcher_cls is build
    with ThreadPoolExecutor(8) as pool:         # without it they overlap: the test can fail
        list(pool.map(lambda i: driver.launcher_cls(i, "meta"), range(16)))
    assert most[0] > 1
