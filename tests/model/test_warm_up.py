"""Warm-up batches (appliance/model/warm_up.py): their shapes, and that running them writes
nothing (the cache and the next greedy tokens are as without them)."""
from __future__ import annotations

import torch

from appliance.model import ModelRunner
from appliance.model.tiny import ensure_tiny_checkpoint
from appliance.model.warm_up import (CHUNK_TOKENS, DECODE_CONTEXT, DECODE_ROWS,
                                     warm_up_batches)
from helpers import greedy_generate, hf_greedy


def test_batches_cover_chunk_sizes_and_mixed_steps():
    batches = warm_up_batches(8192, 32768, 64, torch.device("cpu"))
    sizes = sorted(set(CHUNK_TOKENS) | {8192})
    n = len(sizes)
    whole, mixed = batches[:n], batches[n:2 * n]
    many, short = batches[2 * n:-1], batches[-1]
    assert len(batches) == 2 * n + len(DECODE_ROWS) + 1
    for b in batches:
        b.validate()
        assert bool((b.slot_mapping == -1).all()) and not b.page_table.any()
        assert b.extend_keys == int(b.seq_lens[b.num_decode:].sum())
        assert b.page_table.shape[1] * 64 >= int(b.seq_lens.max())
    assert [b.num_tokens for b in whole] == sizes and {b.num_decode for b in whole} == {0}
    for b, t in zip(mixed, sizes):
        prefix = DECODE_CONTEXT
        assert b.num_decode == 1 and b.seq_lens.tolist() == [DECODE_CONTEXT, prefix + t - 1]
        assert b.prefix_lens.tolist() == [DECODE_CONTEXT - 1, prefix]
        assert b.positions[1:].tolist() == list(range(prefix, prefix + t - 1))
    for b, d in zip(many, DECODE_ROWS):
        assert b.num_decode == d and b.seq_lens.tolist() == [DECODE_CONTEXT] * d + [16]
    assert short.seq_lens.tolist() == [2, 16] and short.page_table.shape[1] == 1


def test_batches_fit_short_limits():
    batches = warm_up_batches(100, 150, 16, torch.device("cpu"))
    assert [b.num_tokens for b in batches if b.num_decode == 0] == [16, 64, 100]
    assert all(int(b.seq_lens.max()) <= 150 for b in batches)
    long_chunk = [b for b in batches if b.num_decode == 1 and b.num_tokens == 100][0]
    assert long_chunk.prefix_lens.tolist() == [149, 51]   # the prefix is cut to fit 150


def test_warm_up_writes_nothing(tmp_path):
    folder = ensure_tiny_checkpoint(tmp_path / "tiny")
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4, 8]]
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    runner.warm_up(80, 200)
    assert all(not c.any() for caches in runner.kv_caches for c in caches)
    assert greedy_generate(runner, prompts, 4) == hf_greedy(folder, prompts, 4)
