"""CUDA graphs of decode-only steps: launch overhead off the batch-1 critical path.

`DecodeGraphs` captures the model's forward for decode-only batches (every row one token)
at bucketed batch sizes, over static input buffers. `run` copies a batch into the buffers,
pads the unused rows of its bucket (slot -1: the cache write skips them; seq_len 1 over
page 0: read, then discarded), replays the bucket's graph and returns the live rows'
logits. Batches with prefill rows, more rows than the largest bucket, or a page table wider
than `max_pages` run eagerly. The page table is always presented `max_pages` wide, so the
attention kernels choose their split-KV for `max_pages * page_size` tokens.
Every rank makes the same choice for the same batch, so collectives stay matched (NCCL
collectives are captured into the graph like any kernel). `forward` picks what is captured:
the model's forward (logits), or e.g. `forward_hidden` (logits and every token's hidden
state, for MTP drafts).
"""
from __future__ import annotations

import bisect

import torch
from typing import Callable

from torch import nn

from appliance.model.batch import ForwardBatch

Output = torch.Tensor | tuple[torch.Tensor, ...]

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def capture(forward: Callable[[ForwardBatch], Output], make_batch: Callable[[], ForwardBatch],
            device: torch.device, pool) -> tuple[torch.cuda.CUDAGraph, Output]:
    """A CUDA graph of forward(make_batch()) in memory pool `pool` (None: a new one), and its
    output tensors. An eager run on a side stream first compiles (or loads) the kernels
    outside the capture; one is enough, as nothing autotunes (a second cost the 8B's
    start-up 28 more eager forwards, about a second). make_batch runs outside the capture
    too: what it writes into the static buffers must not be replayed over the next step's
    inputs."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        forward(make_batch())
    torch.cuda.current_stream(device).wait_stream(side)
    batch = make_batch()  # fresh views: nothing the warm-up runs memoized on them
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward(batch)
    return graph, out


def decode_buckets(max_batch: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> list[int]:
    """The batch sizes captured for steps of up to `max_batch` rows."""
    return sorted({b for b in buckets if b < max_batch} | {max_batch})


def decode_capture_batch(bs: int, max_pages: int, device: torch.device) -> ForwardBatch:
    """A batch laid out as the bucket of `bs` rows is captured (DecodeGraphs' buffers, fresh):
    one token a row, seq_len 1 over page 0, no cache write."""
    i32 = dict(dtype=torch.int32, device=device)
    return ForwardBatch(
        input_ids=torch.zeros(bs, **i32), positions=torch.zeros(bs, **i32),
        query_start=torch.arange(bs + 1, **i32), prefix_lens=torch.zeros(bs, **i32),
        seq_lens=torch.ones(bs, **i32), page_table=torch.zeros(bs, max_pages, **i32),
        slot_mapping=torch.full((bs,), -1, **i32), num_decode=bs)


class DecodeGraphs:
    def __init__(self, model: nn.Module, device: torch.device, max_batch: int, max_pages: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 forward: Callable[[ForwardBatch], Output] | None = None) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.device, self.max_pages = model, device, max_pages
        self.forward = forward or model
        self.buckets = decode_buckets(max_batch, buckets)
        self.max_batch = self.buckets[-1]
        full = decode_capture_batch(self.max_batch, max_pages, device)  # the static buffers
        self.input_ids, self.positions = full.input_ids, full.positions          # [N], [N]
        self.seq_lens, self.page_table = full.seq_lens, full.page_table          # [N], [N, P]
        self.slot_mapping, self.prefix_lens = full.slot_mapping, full.prefix_lens  # [N], [N]
        self.query_start = full.query_start                      # [N+1]: one token per row
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Output]] = {}
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.buckets):  # largest first: later graphs reuse its pool
                graph, out = capture(self.forward, lambda: self._batch(bs), device, pool)
                pool = graph.pool()
                self.graphs[bs] = (graph, out)
        self.pool = pool  # the graphs' memory pool (the extend graphs share it)

    def _batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs],
            query_start=self.query_start[: bs + 1], prefix_lens=self.prefix_lens[:bs],
            seq_lens=self.seq_lens[:bs], page_table=self.page_table[:bs],
            slot_mapping=self.slot_mapping[:bs], num_decode=bs)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.num_decode == batch.num_rows == batch.num_tokens
                and batch.num_rows <= self.max_batch
                and batch.page_table.shape[1] <= self.max_pages)

    def run(self, batch: ForwardBatch) -> Output:
        """logits [B, V_padded] of a decode-only batch (a view of the graph's output; each of
        its tensors' first B rows when `forward` returns several)."""
        rows = batch.num_rows
        bs = self.buckets[bisect.bisect_left(self.buckets, rows)]
        width = batch.page_table.shape[1]
        self.input_ids[:rows].copy_(batch.input_ids)
        self.positions[:rows].copy_(batch.positions)
        self.seq_lens[:rows].copy_(batch.seq_lens)
        self.prefix_lens[:rows].copy_(batch.prefix_lens)
        self.slot_mapping[:rows].copy_(batch.slot_mapping)
        self.page_table[:rows, :width].copy_(batch.page_table)
        if rows < bs:  # padding rows: no cache write, one key from page 0
            self.slot_mapping[rows:bs].fill_(-1)
            self.seq_lens[rows:bs].fill_(1)
            self.page_table[rows:bs, 0].fill_(0)
        graph, out = self.graphs[bs]
        graph.replay()
        return tuple(o[:rows] for o in out) if isinstance(out, tuple) else out[:rows]
