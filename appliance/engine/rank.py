"""Entry point of one engine rank process (spawned by EngineClient).

A rank ends with the frontend that spawned it and, for ranks > 0, with rank 0 (lifeline.py).
torch.distributed listens on the loopback interface only (the store and gloo's connections).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

import kernels
from appliance.config import AppConfig, ConfigError
from appliance.engine import protocol
from appliance.engine.channel import EngineEndpoints, connect_socket
from appliance.engine.lifeline import die_with, name_process
from appliance.engine.model_files import ModelFiles
from appliance.engine.plan_arrays import PlanChannel
from appliance.model.loader import LoadError

log = logging.getLogger("tokenspeed.engine")

# How gloo and NCCL say a peer rank went away mid-collective (a CPU TP=2 rank SIGKILLed: gloo's
# "Connection closed by peer ... typically caused by a remote worker crashing"). The survivor's
# stack says nothing more: QA found ~50 lines of it before the client's one-line cause.
_PEER_GONE = ("closed by peer", "reset by peer", "remote worker crashing", "Broken pipe",
              "communicator was aborted")


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank died."""
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in _PEER_GONE)


# Start-up runs Python on several threads at once: compile-ahead's batches (a GIL release and
# re-take around every Triton launch), the weight load's loop over tensors, the grammar
# compiler's tokenizer. A thread that released the GIL for a C call waits up to the switch
# interval (5 ms by default) for a busy thread to hand it back; thousands of such calls add up
# (scripts/bench_switch_interval.py, 2 cores: 3,000 small tensor loads beside 4 busy threads
# took 324 s at 5 ms, 19 s at 0.2 ms, 1.1 s alone).
STARTUP_SWITCH_INTERVAL_S = 2e-4


@contextmanager
def quick_gil_handoffs(interval_s: float = STARTUP_SWITCH_INTERVAL_S) -> Iterator[None]:
    """Python's thread switch interval at `interval_s` inside the block, then as it was."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


class StartupError(RuntimeError):
    """A setting that cannot work with this model or machine; the message says which keys."""


def run_rank(config: AppConfig, files: ModelFiles, endpoints: EngineEndpoints | None, rank: int,
             dist_port: int, lifelines: tuple[int, ...]) -> None:
    """`endpoints`: rank 0's way to the frontend (None on other ranks); `lifelines`: the pids
    this rank must not outlive (the frontend, then rank 0)."""
    name_process(f"tokenspeed-r{rank}")
    die_with(*lifelines)
    # Ctrl-C, and a stop of the whole group (systemd's default, `timeout`), reach every rank:
    # the frontend drains, then tells rank 0 to stop (a rank dead of it read as an engine
    # failure mid-shutdown). The lifelines end a rank whose frontend is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # `tokenspeed up` passes its verbosity (WARNING unless -v: its progress display tells the stages).
    logging.basicConfig(level=os.environ.get("TOKENSPEED_RANK_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    code, nccl = 0, False
    try:
        device = resolve_device(config.device, rank)
        if device.type == "cpu":
            _share_cpu_cores(config.parallel.tp_size)
        channel = PlanChannel(_init_distributed(config.parallel.tp_size, rank, dist_port, device))
        nccl = dist.is_initialized() and device.type == "cuda"
        kernels.set_overrides(dict(config.kernels.override))
        vocab = _vocabulary(config, files) if rank == 0 else None   # (size, eos ids)
        with quick_gil_handoffs():
            compiler = _start_grammar_compiler(files, *vocab) if vocab is not None else None
            runner = _build_runner(config, files, device, rank, endpoints,
                                   _sampler_warm_up(device, vocab[0]) if vocab is not None else ())
        from appliance.engine.engine import Engine, run_worker

        if rank == 0:
            check_kv_pool(config, runner)
            Engine(config, runner, channel, endpoints, compiler=compiler).run()
        else:
            run_worker(runner, channel, mtp=config.speculative.method == "mtp")
    except Exception as e:
        if isinstance(e, (StartupError, ConfigError, LoadError)):  # the message says it all
            message = str(e)
            log.error("engine rank %d: %s", rank, message)
        elif lost_peer(e):   # the client names the rank that died, and how
            message = f"{type(e).__name__}: {e}"
            log.error("engine rank %d: a collective failed, another rank is gone: %s", rank,
                      str(e).splitlines()[0][:300])
            log.debug("%s", traceback.format_exc())
        else:
            message = f"{type(e).__name__}: {e}"
            log.error("engine rank %d failed:\n%s", rank, traceback.format_exc())
        if rank == 0:
            _report_failure(endpoints, message)
        code = 1
    if nccl:
        # Tearing NCCL down while captured CUDA graphs still reference its communicators hangs
        # (measured: every TP rank with graphs outlived the 30 s stop deadline); the OS frees
        # the GPU and the sockets when the process ends.
        logging.shutdown()
        os._exit(code)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


def resolve_device(device: str, rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for but torch sees no GPU")
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _share_cpu_cores(tp_size: int) -> None:
    """CPU ranks share the cores this process may run on (its affinity: a container or
    `taskset` may allow fewer than the machine has), one intra-op thread pool each. The
    frontend is left no core of its own: it needs one only in bursts, and on a quiet 2-core
    machine (scripts/bench_cpu_decode.py, SmolLM2-135M) 2 engine threads against 1 gave decode
    24.3 against 16.3 tok/s at batch 1 and 95.4 against 55.6 at batch 8 (transformers, 2
    threads: 26.7 and 112.5). Oversubscribed (several ranks or a busy machine) the threads
    wait on each other at every op, so ranks never share a core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // tp_size))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_kv_pool(config: AppConfig, runner) -> None:
    """Refuse a KV pool that cannot hold one request of max_model_len tokens."""
    max_len = min(config.model.max_model_len, runner.max_model_len)
    needed = -(-max_len // runner.page_size)
    if runner.num_pages < needed:
        raise StartupError(
            f"the KV pool holds {runner.num_pages * runner.page_size} tokens ({runner.num_pages} "
            f"pages of {runner.page_size}) but one request of max_model_len {max_len} tokens needs "
            f"{needed} pages: raise kv.num_pages (or kv.memory_fraction) or lower "
            "model.max_model_len")


_DIST_TIMEOUT = timedelta(minutes=30)


def _init_distributed(tp_size: int, rank: int, port: int, device: torch.device):
    """The model's TP group (NCCL on GPU, gloo on CPU) and a gloo group for the plan broadcast."""
    if tp_size == 1:
        return None
    # Every rank is on this machine: connections between them stay on loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=_loopback_store(rank, tp_size, port), rank=rank,
                            world_size=tp_size, timeout=_DIST_TIMEOUT)
    return dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


def _loopback_store(rank: int, world_size: int, port: int) -> dist.TCPStore:
    """The rendezvous store. TCPStore's server listens on every interface unless handed a
    socket: rank 0 binds one to 127.0.0.1 and gives it over."""
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=_DIST_TIMEOUT)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=True, timeout=_DIST_TIMEOUT,
                         master_listen_fd=sock.detach())


def _vocabulary(config: AppConfig, files: ModelFiles) -> tuple[int, list[int]]:
    """The model's vocabulary size and EOS ids, before it loads."""
    from appliance.model.runner import model_source, vocabulary

    return vocabulary(model_source(config, files))


def _start_grammar_compiler(files: ModelFiles, vocab_size: int, eos_ids: list[int]):
    """Rank 0's constraint compiler, its tokenizer building while the weights load and the
    graphs capture (see GrammarCompiler)."""
    from appliance.engine.constraints import GrammarCompiler

    return GrammarCompiler(files.tokenizer, vocab_size, eos_ids)


def _sampler_warm_up(device: torch.device, vocab_size: int) -> tuple:
    """Rank 0's sampler warm-up (the Engine runs it again, then compiled), for the runner to
    compile beside the weight load."""
    from appliance.engine.sampler import Sampler

    return (Sampler(device, vocab_size).warm_up_launch(vocab_size),)


def _build_runner(config: AppConfig, files: ModelFiles, device: torch.device, rank: int,
                  endpoints: EngineEndpoints | None, compile_also: tuple = ()):
    """The model runner; rank 0 tells the frontend each start-up stage (`tokenspeed up` shows
    them)."""
    from appliance.model import ModelRunner
    from appliance.model.runner import KVPoolError

    torch.manual_seed(config.model.seed)
    outbox = _FrontendOutbox(endpoints) if endpoints is not None else None
    try:
        on_stage = None if outbox is None else (
            lambda stage, summary: outbox.send(protocol.Progress(stage, summary)))
        return ModelRunner.from_config(config, files, device, resolve_dtype(config.model.dtype, device),
                                       tp_rank=rank, tp_size=config.parallel.tp_size,
                                       on_stage=on_stage, compile_also=compile_also)
    except KVPoolError as e:  # names the setting: one line, not a traceback
        raise StartupError(str(e)) from None
    finally:
        if outbox is not None:
            outbox.close()  # delivered before the engine loop's own socket sends Ready


class _FrontendOutbox:
    """A socket of its own to the frontend, for the messages before the engine loop runs."""

    def __init__(self, endpoints: EngineEndpoints) -> None:
        import zmq

        self._ctx = zmq.Context()
        self._sock = connect_socket(self._ctx, zmq.PUSH, endpoints.outputs, endpoints)

    def send(self, message: protocol.FromEngine) -> None:
        self._sock.send(protocol.encode(message))

    def close(self) -> None:
        self._sock.close(linger=2000)
        self._ctx.term()


def _report_failure(endpoints: EngineEndpoints, message: str) -> None:
    outbox = _FrontendOutbox(endpoints)
    outbox.send(protocol.Failed(message))
    outbox.close()
