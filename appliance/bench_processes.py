"""A throughput load's streams spread over several client processes.

One Python process parsing every stream's events runs out of its core first: on an H200 at 256
streams of the 8B, `tokenspeed bench` ran at 100% of a core through both decode phases while the
frontend ran at 70-99% (gpu_profile's CPU samples). The client then read the streams seconds
behind the daemon, and started the next requests that much late (a 6 s lull between the load's
two waves). Each process here carries STREAMS_PER_PROCESS streams on its own event loop and
HTTP clients; they start together once all are connected, and hand back their requests'
figures (durations and rates, no clock shared between processes).
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import time

from appliance import bench
from appliance.config import AppConfig

STREAMS_PER_PROCESS = 64
START_TIMEOUT_S = 120.0


def processes_for(concurrency: int) -> int:
    return -(-concurrency // STREAMS_PER_PROCESS)


def split(items: list, parts: int) -> list[list]:
    """`parts` interleaved shares of `items`, as even as they go."""
    return [items[k::parts] for k in range(parts)]


async def run_in_processes(config: AppConfig, tcp: bool, model: str, prompts: list[list[int]],
                           output_len: int, concurrency: int,
                           sampling: bench.Sampling = bench.GREEDY
                           ) -> tuple[float, list[bench.RequestResult]]:
    """The load's start time (perf_counter, once every process is connected) and each
    request's result; `concurrency` streams in all, over processes_for(concurrency)."""
    parts = min(processes_for(concurrency), len(prompts))
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_client_process, daemon=True, name=f"tokenspeed-bench-{k}",
                         args=(config, tcp, model, share, output_len, sampling, streams, ready,
                               go, results))
             for k, (share, streams) in enumerate(zip(split(prompts, parts),
                                                      _streams(concurrency, parts)))]
    for proc in procs:
        proc.start()
    try:
        await asyncio.to_thread(_gather, ready, parts, procs, START_TIMEOUT_S)
        started = time.perf_counter()
        go.set()
        shares = await asyncio.to_thread(_gather, results, parts, procs, None)
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    return started, [result for share in shares for result in share]


def _streams(concurrency: int, parts: int) -> list[int]:
    return [concurrency // parts + (k < concurrency % parts) for k in range(parts)]


def _gather(channel, count: int, procs: list, timeout_s: float | None) -> list:
    """`count` messages from the processes; a process's error or death is the load's."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    messages = []
    while len(messages) < count:
        try:
            message = channel.get(timeout=1.0)
        except queue.Empty:
            if any(not proc.is_alive() and proc.exitcode != 0 for proc in procs):
                raise bench.BenchError("a bench client process died") from None
            if deadline is not None and time.monotonic() > deadline:
                raise bench.BenchError("the bench client processes did not connect") from None
            continue
        if isinstance(message, str):
            raise bench.BenchError(message)
        messages.append(message)
    return messages


def _client_process(config: AppConfig, tcp: bool, model: str, prompts: list[list[int]],
                    output_len: int, sampling: bench.Sampling, streams: int, ready, go,
                    results) -> None:
    try:
        results.put(asyncio.run(_client_main(config, tcp, model, prompts, output_len, sampling,
                                             streams, ready, go)))
    except Exception as e:  # the parent raises it as the load's error, waiting on either queue
        message = f"a bench client process failed: {type(e).__name__}: {e}"
        ready.put(message)
        results.put(message)


async def _client_main(config: AppConfig, tcp: bool, model: str, prompts: list[list[int]],
                       output_len: int, sampling: bench.Sampling, streams: int, ready, go
                       ) -> list[bench.RequestResult]:
    async with bench.stream_clients(config, tcp, streams) as clients:
        ready.put(True)
        await asyncio.to_thread(go.wait)
        return await bench.bounded(streams, clients, [
            lambda client, p=p: bench.complete(client, model, p, output_len, sampling=sampling)
            for p in prompts])
