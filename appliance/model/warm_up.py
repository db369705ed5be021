"""Warm-up batches: compile the eager path's GPU kernels before the first request.

Triton compiles a kernel variant on its first launch (one to several seconds each for the
attention and MoE kernels). CUDA-graph capture compiles the decode-only path; prefill chunks
and mixed batches run eagerly, so without a warm-up the first requests of each kind wait for
those compiles (measured on an H200, DeepSeek-V2-Lite agentic bench: TTFT p99 5-11 s on the
first pass). The batches here reach each kernel choice the appliance makes by shape: chunk
sizes across the MoE tile configs; whole-new prefills (the contiguous prefill kernel) and
chunks over a cached prefix (gathered); chunks under and over the decompressed-MLA threshold;
and decode rows beside them (eager decode, split or not, and the split merge).

Nothing is written: every slot is -1 (the cache write skips it) and every page-table entry is
page 0, whose contents are read and discarded.
"""
from __future__ import annotations

import torch

from appliance.model.batch import ForwardBatch
from appliance.model.layers.mla import DECOMPRESS_MIN_TOKENS

# Plus the scheduler's max_batch_tokens. 128 and 640: the ends of the generic paged kernel's
# 16-row tiles (<= 128 tokens) and of its split launches of 128-row tiles (<= 640 at 16
# heads on 132 SMs), which MLA's decompressed prefill reaches (80+ tokens a row): DeepSeek-V2-
# Lite on an H200 compiled both while serving (tests/model/test_warm_up.py)
CHUNK_TOKENS = (16, 64, 128, 256, 640, 1024, 4096)
DECODE_CONTEXT = 4096                      # the decode rows' length: long enough to split
DECODE_ROWS = (1, 2, 4, 8)                 # the split merge's column blocks vary up to 8 rows


def warm_up_batches(max_tokens: int, max_len: int, page_size: int, device: torch.device
                    ) -> list[ForwardBatch]:
    """For each chunk size T <= max_tokens: one row of T new tokens, and a decode row beside
    a chunk of T - 1 new tokens over a long prefix (DECODE_CONTEXT tokens, less where max_len
    needs: short chunks there split over their keys), and one beside MLA's shortest
    decompressed chunk (the only decompressed launch of 16-row tiles that splits). Then
    DECODE_ROWS decode rows beside a small chunk, and a short decode row (one split)."""
    sizes = sorted({t for t in CHUNK_TOKENS + (max_tokens,) if 2 <= t <= min(max_tokens, max_len)})
    batches = [_batch([(0, t)], 0, page_size, device) for t in sizes]
    long_decode = (min(DECODE_CONTEXT, max_len) - 1, 1)
    chunks = [t - 1 for t in sizes]
    if DECOMPRESS_MIN_TOKENS < max_tokens:
        chunks.append(DECOMPRESS_MIN_TOKENS)
    for new in chunks:
        prefix = max(0, min(DECODE_CONTEXT, max_len - new))
        batches.append(_batch([long_decode, (prefix, new)], 1, page_size, device))
    small = (0, sizes[0])
    batches += [_batch([long_decode] * d + [small], d, page_size, device) for d in DECODE_ROWS]
    batches.append(_batch([(1, 1), small], 1, page_size, device))
    return batches


def _batch(rows: list[tuple[int, int]], num_decode: int, page_size: int,
           device: torch.device) -> ForwardBatch:
    """rows: (cached prefix, new tokens) each -> a batch that writes nothing (slots -1)."""
    seq_lens = [p + n for p, n in rows]
    positions = torch.cat([torch.arange(p, p + n) for p, n in rows])                  # [T]
    starts = torch.tensor([0] + [n for _, n in rows]).cumsum(0)                       # [B+1]
    width = -(-max(seq_lens) // page_size)
    i32 = dict(dtype=torch.int32, device=device)
    return ForwardBatch(
        input_ids=torch.zeros(positions.shape[0], **i32), positions=positions.to(**i32),
        query_start=starts.to(**i32), prefix_lens=torch.tensor([p for p, _ in rows], **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        page_table=torch.zeros(len(rows), width, **i32),
        slot_mapping=torch.full((positions.shape[0],), -1, **i32), num_decode=num_decode,
        extend_keys_host=sum(seq_lens[num_decode:]))
