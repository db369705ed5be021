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
    whole, mixed, mla = batches[:n], batches[n:2 * n], batches[2 * n]
    many, short = batches[2 * n + 1:-1], batches[-1]
    assert len(batches) == 2 * n + 1 + len(DECODE_ROWS) + 1
    assert mla.num_decode == 1 and mla.seq_lens.tolist() == [DECODE_CONTEXT, DECODE_CONTEXT + 80]
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


def _mla_prefill_variants(monkeypatch, row_sets: list[list[tuple[int, int]]]) -> set:
    """The generic paged kernel's constexprs (its Triton variant, the per-batch ints being
    unspecialized) that DeepSeek-V2-Lite's decompressed prefill launches on an H200 (132 SMs,
    16 heads) for each set of prefill rows (cached prefix, new tokens) that attends
    decompressed; the launch recorded, not run."""
    import kernels.triton.attention as attention
    from kernels.triton.attention_ops import mla_prefill
    from types import SimpleNamespace

    from appliance.model.layers.mla import MLAttention

    seen: set = set()

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **constexprs: seen.add(tuple(sorted(constexprs.items())))

    monkeypatch.setattr(attention, "_paged_attn_kernel", Recorder())
    monkeypatch.setattr(attention, "merge_splits", lambda *a, **k: None)
    monkeypatch.setattr("kernels.triton.split_kv.num_sms", lambda device: 132)
    layer = SimpleNamespace(decompress_min_tokens=80, decompress_max_keys=65536)
    for rows in row_sets:
        new = sum(n for _, n in rows)
        keys = sum(p + n for p, n in rows)
        batch = SimpleNamespace(graph_bucket=False, num_rows=len(rows), num_decode=0,
                                num_tokens=new, extend_keys=keys)
        if not MLAttention.decompress_extend(layer, batch):
            continue
        seq_lens = torch.tensor([p + n for p, n in rows], dtype=torch.int32)
        query_start = torch.tensor([0] + [n for _, n in rows]).cumsum(0).to(torch.int32)
        q = torch.empty(new, 16, 192, dtype=torch.bfloat16)
        kv = torch.empty(keys, 16, 256, dtype=torch.bfloat16)
        mla_prefill(q[..., :128], q[..., 128:], kv[..., :128], torch.empty(keys, 64,
                    dtype=torch.bfloat16), kv[..., 128:], query_start, seq_lens, 0.1)
    return seen


def test_short_mla_prefills_find_their_kernel_variants_warmed(monkeypatch):
    """DeepSeek-V2-Lite on an H200 compiled two variants of the generic paged kernel while
    serving: a 128-token prompt (the 16-row tiles of launches of <= 128 tokens, which no
    warm-up chunk of 80+ new tokens reached) and a split launch of > 512 tokens. Every whole
    prompt of 80 to 2,048 tokens and every chunk over a prefix tried here now launches a
    variant the warm-up batches launch."""
    warm = []
    for b in warm_up_batches(8192, 32768, 64, torch.device("cpu")):
        starts, prefix = b.query_start.tolist(), b.prefix_lens.tolist()
        warm.append([(prefix[i], starts[i + 1] - starts[i])
                     for i in range(b.num_decode, b.num_rows)])
    warmed = _mla_prefill_variants(monkeypatch, warm)
    prompts = [[(0, t)] for t in range(80, 2049, 8)]
    chunks = [[(p, t)] for p in (500, 4096, 16000) for t in (80, 100, 128, 300, 600, 2000)]
    chunks += [[(16000, 2000)] * 2, [(0, 700), (0, 700)]]
    served = _mla_prefill_variants(monkeypatch, prompts + chunks)
    assert served <= warmed, served - warmed
