"""CUDA graphs of decode-only steps: launch overhead off the batch-1 critical path.

`DecodeGraphs` captures the model's forward for decode-only batches (every row one token)
at bucketed batch sizes, over static input buffers (`DecodeInputs`). `run` stages a batch
into the buffers (one or two launches, and the unused rows of its bucket padded), replays
the bucket's graph and returns the live rows' logits. Batches with prefill rows, more rows
than the largest bucket, or a page table wider than `max_pages` run eagerly. The page table
is always presented `max_pages` wide, so the attention kernels choose their split-KV for
`max_pages * page_size` tokens.
Every rank makes the same choice for the same batch, so collectives stay matched (NCCL
collectives are captured into the graph like any kernel). `forward` picks what is captured:
the model's forward (logits), or e.g. `forward_hidden` (logits and every token's hidden
state, for MTP drafts).
"""
from __future__ import annotations

import bisect
from functools import partial

import torch
from typing import Callable

from torch import nn

from appliance.model.batch import ForwardBatch

Output = torch.Tensor | tuple[torch.Tensor, ...]

# 160: cuBLAS's linear layers of the 8B cost about the same for 96-128 rows, then climb (H100,
# `gpu_few_rows_bench.py --cublas-only`, us a step: 128 5,851, 144 6,012, 160 6,085, 192 6,418,
# 224 6,788, 256 6,811), so a batch of 129-160 rows padded to 192 paid ~0.33 ms a step more
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


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


# The per-row int fields a decode step stages beside the page table; query_start is the same
# for every decode step of a bucket (one token a row: 0..bs).
ROW_FIELDS = ("input_ids", "positions", "seq_lens", "prefix_lens", "slot_mapping")


class DecodeInputs:
    """The static input buffers of the decode graphs (laid out for `max_batch` rows and a
    `max_pages`-wide page table; a bucket reads the first rows) and the staging of a batch
    into them: the per-row fields in one launch, the page table in the same one when its
    rows are contiguous there (one row) and in another when not; the bucket's padding rows
    (slot -1: the cache write skips them; seq_len 1 over page 0: read, then discarded) only
    when the batch leaves some."""

    def __init__(self, max_batch: int, max_pages: int, device: torch.device) -> None:
        self.max_pages = max_pages
        self.full = decode_capture_batch(max_batch, max_pages, device)

    def view(self, bs: int) -> ForwardBatch:
        """The first `bs` rows of the buffers, as the bucket of `bs` rows reads them."""
        f = self.full
        return ForwardBatch(
            input_ids=f.input_ids[:bs], positions=f.positions[:bs],
            query_start=f.query_start[: bs + 1], prefix_lens=f.prefix_lens[:bs],
            seq_lens=f.seq_lens[:bs], page_table=f.page_table[:bs],
            slot_mapping=f.slot_mapping[:bs], num_decode=bs)

    def stage(self, batch: ForwardBatch, bs: int) -> None:
        """Copy decode-only `batch` (at most bs rows, page table at most max_pages wide) into
        the first bs rows."""
        rows, width = batch.num_rows, batch.page_table.shape[1]
        f = self.full
        dst = [getattr(f, name)[:rows] for name in ROW_FIELDS]
        src = [getattr(batch, name) for name in ROW_FIELDS]
        table = f.page_table[:rows, :width]
        if table.is_contiguous():  # one row (or every column): the same launch takes it
            dst.append(table)
            src.append(batch.page_table)
        else:
            table.copy_(batch.page_table)
        torch._foreach_copy_(dst, src)
        if rows < bs:
            f.slot_mapping[rows:bs].fill_(-1)
            f.seq_lens[rows:bs].fill_(1)
            f.page_table[rows:bs, 0].fill_(0)


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
        self.inputs = DecodeInputs(self.max_batch, max_pages, device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Output]] = {}
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.buckets):  # largest first: later graphs reuse its pool
                graph, out = capture(self.forward, partial(self.inputs.view, bs), device, pool)
                pool = graph.pool()
                self.graphs[bs] = (graph, out)
        self.pool = pool  # the graphs' memory pool (the extend graphs share it)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.num_decode == batch.num_rows == batch.num_tokens
                and batch.num_rows <= self.max_batch
                and batch.page_table.shape[1] <= self.max_pages)

    def run(self, batch: ForwardBatch) -> Output:
        """logits [B, V_padded] of a decode-only batch (a view of the graph's output; each of
        its tensors' first B rows when `forward` returns several)."""
        rows = batch.num_rows
        bs = self.buckets[bisect.bisect_left(self.buckets, rows)]
        self.inputs.stage(batch, bs)
        graph, out = self.graphs[bs]
        graph.replay()
        return tuple(o[:rows] for o in out) if isinstance(out, tuple) else out[:rows]
