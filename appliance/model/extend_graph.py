"""CUDA graphs of extend steps: prefill chunks and speculative verify rows, mixed with decodes.

A step that is not decode-only used to launch its kernels one by one: on an 8B model that
is ~25 ms of host time a step, more than the GPU needs for a few hundred tokens. Such steps
are ragged (rows of any length), but the extend attention kernels read the row layout from
device tensors (query_start, seq_lens) and size their grid from the token and row counts
alone (kernels/triton/paged_tiles.py), so one graph serves every step of up to `tokens`
tokens once the step is laid out in a bucket's shape:

- `tokens` tokens and `rows` = min(tokens, max_rows + 1) rows, every row an extend row (a
  decode row is an extend row of one token: the model takes its attention through the
  extend kernel);
- rows [0, B) are the step's; rows [B, rows - 1) are empty; the last row owns the padding
  tokens [T, tokens), at positions 0.. over page 0, with no cache write (slot -1): their
  keys are finite (the cache is zeroed at allocation), so nothing downstream sees a NaN;
- logits at `logits` = min(tokens, max_logits) token indices: the step's (each row's last
  token, or every verify token), then token 0 again.

`ExtendGraphs.run` copies a step into the static buffers, replays its bucket's graph and
returns the step's logits rows. `pad_extend_batch` is the same layout as a plain function (the
CPU tests check its logits against the unpadded step's).
"""
from __future__ import annotations

import bisect
from typing import Callable

import torch
from torch import nn

from appliance.model.batch import ForwardBatch
from appliance.model.cuda_graph import Output, capture

# Token counts a graph is captured for (up to the runner's limit): a step runs in the
# smallest that holds it (160: as cuda_graph.DEFAULT_BUCKETS says).
DEFAULT_TOKEN_BUCKETS: tuple[int, ...] = (8, 16, 32, 48, 64, 96, 128, 160, 192, 256, 384, 512,
                                          768, 1024, 1536, 2048)


# With speculation, the most logits rows a graph computes: a verify step needs one per token of
# its verify rows (B x (1 + k)), 144 at 16 rows of 8 drafts. Without this a step of more logits
# than the graphs' rows ran eagerly: SmolLM2 at 16 users of the edit workload (max_running 64:
# 64 logits) verified 144 tokens a step in ~16 ms on an H200 and lost a third of its per-user
# TPS to speculation. Every bucket computes min(tokens, this) rows of the LM head, so the
# larger buckets (prefill chunks) pay for the rows they do not use: kept to 512.
VERIFY_GRAPH_LOGITS = 512


def graph_logits(max_rows: int, max_draft: int) -> int:
    """Logits rows the extend graphs hold for steps of up to `max_rows` rows: one a row, and
    with drafts (`max_draft` > 0) one a verify token, up to VERIFY_GRAPH_LOGITS."""
    if max_draft <= 0:
        return max_rows
    return max(max_rows, min(max_rows * (1 + max_draft), VERIFY_GRAPH_LOGITS))


def bucket_shape(tokens: int, max_rows: int, max_logits: int) -> tuple[int, int]:
    """(rows, logits) of the bucket of `tokens` tokens: one row more than a step may have
    (the padding row), never more rows or logits than tokens."""
    return min(tokens, max_rows + 1), min(tokens, max_logits)


def fits(batch: ForwardBatch, tokens: int, max_rows: int, max_logits: int,
         max_pages: int) -> bool:
    """Whether `batch` can be laid out in the bucket of `tokens` tokens. (A step's rows
    never fill the bucket's unless its tokens do: every row has a token.)"""
    _, logits = bucket_shape(tokens, max_rows, max_logits)
    return (batch.num_tokens <= tokens and batch.num_rows <= max_rows
            and batch.num_logits <= logits and batch.page_table.shape[1] <= max_pages)


def fill_padded(dst: ForwardBatch, batch: ForwardBatch) -> None:
    """Write `batch` into `dst`'s tensors (a bucket's shape, module doc), padding included."""
    t, b, n = batch.num_tokens, batch.num_rows, batch.num_logits
    width = batch.page_table.shape[1]
    dst.input_ids[:t].copy_(batch.input_ids)
    dst.positions[:t].copy_(batch.positions)
    dst.slot_mapping[:t].copy_(batch.slot_mapping)
    dst.query_start[: b + 1].copy_(batch.query_start)
    dst.prefix_lens[:b].copy_(batch.prefix_lens)
    dst.seq_lens[:b].copy_(batch.seq_lens)
    dst.page_table[:b, :width].copy_(batch.page_table)
    dst.logit_index[:n].copy_(batch.logit_token_index)
    fill_padding(dst, t, b, n)


def fill_padding(dst: ForwardBatch, t: int, b: int, n: int) -> None:
    """Pad `dst` after a step of t tokens, b rows and n logits rows (module doc); with
    t = b = n = 0, the whole bucket is one padding row (what a graph is warmed up on)."""
    tokens, rows, pad = dst.num_tokens, dst.num_rows, dst.num_tokens - t
    dst.logit_index[n:].fill_(0)
    if b == 0:
        dst.query_start[0].fill_(0)
    dst.query_start[b + 1: rows].fill_(t)          # empty rows, then the padding row's end
    dst.query_start[rows].fill_(tokens)
    dst.prefix_lens[b:].fill_(0)
    dst.seq_lens[b: rows - 1].fill_(0)
    if rows > b:
        dst.seq_lens[rows - 1].fill_(pad)
        dst.page_table[rows - 1].fill_(0)
    if pad:
        dst.input_ids[t:].fill_(0)
        torch.arange(pad, out=dst.positions[t:])
        dst.slot_mapping[t:].fill_(-1)


def empty_batch(tokens: int, rows: int, logits: int, max_pages: int,
                device: torch.device) -> ForwardBatch:
    """A ForwardBatch of a bucket's shape over fresh int32 tensors (zeros; slots -1)."""
    i32 = dict(dtype=torch.int32, device=device)
    return ForwardBatch(
        input_ids=torch.zeros(tokens, **i32), positions=torch.zeros(tokens, **i32),
        query_start=torch.zeros(rows + 1, **i32), prefix_lens=torch.zeros(rows, **i32),
        seq_lens=torch.zeros(rows, **i32), page_table=torch.zeros(rows, max_pages, **i32),
        slot_mapping=torch.full((tokens,), -1, **i32), num_decode=0,
        logit_index=torch.zeros(logits, **i32), graph_bucket=True)


def extend_buckets(max_tokens: int,
                   buckets: tuple[int, ...] = DEFAULT_TOKEN_BUCKETS) -> list[int]:
    """The token counts captured for steps of up to `max_tokens` tokens."""
    return sorted({b for b in buckets if b < max_tokens} | {max_tokens})


def extend_capture_batch(tokens: int, max_rows: int, max_logits: int, max_pages: int,
                         device: torch.device) -> ForwardBatch:
    """A batch laid out as the bucket of `tokens` tokens is captured (ExtendGraphs' idle
    batch, in fresh tensors)."""
    rows, logits = bucket_shape(tokens, max_rows, max_logits)
    batch = empty_batch(tokens, rows, logits, max_pages, device)
    fill_padding(batch, 0, 0, 0)
    return batch


def pad_extend_batch(batch: ForwardBatch, tokens: int, max_rows: int,
                     max_logits: int) -> ForwardBatch:
    """`batch` laid out in the bucket of `tokens` tokens (module doc), as a new batch."""
    rows, logits = bucket_shape(tokens, max_rows, max_logits)
    dst = empty_batch(tokens, rows, logits, batch.page_table.shape[1], batch.input_ids.device)
    fill_padded(dst, batch)
    return dst


class ExtendGraphs:
    def __init__(self, model: nn.Module, device: torch.device, max_rows: int, max_pages: int,
                 max_logits: int, max_tokens: int,
                 buckets: tuple[int, ...] = DEFAULT_TOKEN_BUCKETS,
                 forward: Callable[[ForwardBatch], Output] | None = None,
                 pool=None) -> None:
        """Graphs of steps of up to `max_tokens` tokens, `max_rows` rows and `max_logits`
        logits rows over page tables `max_pages` wide; `forward` as DecodeGraphs'; `pool`: a
        graph memory pool to share (the decode graphs')."""
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.max_rows, self.max_logits, self.max_pages = max_rows, max_logits, max_pages
        self.forward = forward or model
        self.buckets = extend_buckets(max_tokens, buckets)
        rows, logits = bucket_shape(self.buckets[-1], max_rows, max_logits)
        self.buffers = empty_batch(self.buckets[-1], rows, logits, max_pages, device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Output]] = {}
        with torch.inference_mode():
            for tokens in reversed(self.buckets):  # largest first: later graphs reuse its pool
                graph, out = capture(self.forward, lambda: self._idle(tokens), device, pool)
                pool = graph.pool()
                self.graphs[tokens] = (graph, out)
        self.pool = pool

    def _idle(self, tokens: int) -> ForwardBatch:
        """The bucket's views, holding one padding row over every token (to warm up on)."""
        view = self._batch(tokens)
        fill_padding(view, 0, 0, 0)
        return view

    def _batch(self, tokens: int) -> ForwardBatch:
        """The static buffers' views of the bucket of `tokens` tokens."""
        rows, logits = bucket_shape(tokens, self.max_rows, self.max_logits)
        b = self.buffers
        return ForwardBatch(
            input_ids=b.input_ids[:tokens], positions=b.positions[:tokens],
            query_start=b.query_start[: rows + 1], prefix_lens=b.prefix_lens[:rows],
            seq_lens=b.seq_lens[:rows], page_table=b.page_table[:rows],
            slot_mapping=b.slot_mapping[:tokens], num_decode=0,
            logit_index=b.logit_index[:logits], graph_bucket=True)

    def bucket(self, batch: ForwardBatch) -> int | None:
        """The token bucket `batch` runs in (None: it runs eagerly)."""
        i = bisect.bisect_left(self.buckets, batch.num_tokens)
        if i == len(self.buckets):
            return None
        tokens = self.buckets[i]
        return tokens if fits(batch, tokens, self.max_rows, self.max_logits,
                              self.max_pages) else None

    def draft_room(self, rows: int) -> int:
        """Drafts a decode step of `rows` rows may carry and still replay a graph: a draft
        adds a token and a logits row."""
        return max(0, min(self.buckets[-1], self.max_logits) - rows)

    def run(self, batch: ForwardBatch, tokens: int) -> Output:
        """The step's logits [N, V_padded] (and what else `forward` returns, its first T rows):
        views of the graph's outputs, valid until the next replay."""
        fill_padded(self._batch(tokens), batch)
        graph, out = self.graphs[tokens]
        graph.replay()
        if isinstance(out, tuple):  # (logits, per-token tensors...)
            return (out[0][: batch.num_logits],) + tuple(o[: batch.num_tokens] for o in out[1:])
        return out[: batch.num_logits]
