#!/usr/bin/env python3
"""What Python's thread switch interval costs a thread of many short C calls beside busy
threads: a loop of small tensor loads (a seeded generator, randn, copy: what the dummy-weight
load does per tensor), alone and beside N pure-Python threads, at the default 5 ms and at the
0.2 ms that engine ranks use during start-up (appliance/engine/rank.py, quick_gil_handoffs).

    python scripts/bench_switch_interval.py [--tensors 3000] [--busy 4]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import torch


def load(tensors: int) -> float:
    dst = torch.empty(256, 256)
    started = time.perf_counter()
    for i in range(tensors):
        gen = torch.Generator().manual_seed(i)
        dst.copy_(torch.randn(256, 256, generator=gen) * 0.02)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=3000)
    parser.add_argument("--busy", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    default = sys.getswitchinterval()
    print(f"{'busy threads':>12} {'interval ms':>11} {'load s':>7}")
    for busy in (0, args.busy):
        for interval in (default, 2e-4):
            sys.setswitchinterval(interval)
            stop = threading.Event()

            def spin() -> None:
                x = 0
                while not stop.is_set():
                    for i in range(1000):
                        x += i

            threads = [threading.Thread(target=spin) for _ in range(busy)]
            for t in threads:
                t.start()
            took = load(args.tensors)
            stop.set()
            for t in threads:
                t.join()
            print(f"{busy:>12} {interval * 1e3:>11.1f} {took:>7.2f}")
    sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
