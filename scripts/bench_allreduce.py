"""All-reduce time per decode step under tensor parallelism: NCCL all-reduce of one step's
hidden states [tokens, hidden] bf16, timed with CUDA events, times the all-reduces a step makes
(two per decoder layer: after attention and after the MLP/MoE, plus one for the embedding).

    python scripts/bench_allreduce.py --world 2 4 --hidden 4096 --layers 32
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kernel_bench.harness import loop_ms

TOKENS = (1, 16, 64, 256)


def _worker(rank: int, world: int, port: int, hidden: int, layers: int, queue) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    rows = []
    for tokens in TOKENS:
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
        us = loop_ms(lambda: dist.all_reduce(x), iters=200, warmup=20) * 1e3
        rows.append((tokens, us, us * (2 * layers + 1) / 1e3))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, nargs="+", default=[2])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(f"{'world':>5} {'tokens':>6} {'one all-reduce us':>18} {'per step ms':>12}")
    for world in args.world:
        if world > torch.cuda.device_count():
            print(f"{world:>5}  skipped: only {torch.cuda.device_count()} GPU(s)")
            continue
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        mp.start_processes(_worker, args=(world, port, args.hidden, args.layers, queue),
                           nprocs=world, start_method="spawn")
        for tokens, us, step_ms in queue.get():
            print(f"{world:>5} {tokens:>6} {us:>18.1f} {step_ms:>12.2f}")


if __name__ == "__main__":
    main()
