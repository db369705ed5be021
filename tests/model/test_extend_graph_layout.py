"""The extend graphs' step layout (appliance/model/extend_graph.py), checked on the CPU: a step
laid out in a bucket's shape (every row an extend row, empty rows, a padding row, a padded
logits index) gives the unpadded step's logits and leaves the KV cache as the step left it.
Every step of a greedy run (prefill chunks, mixed and decode steps) and a step with verify
rows; a Llama, the Llama over an FP8 cache (whose bucket steps take the decode rows through
the decode launch: graph_step_attention), a Qwen3-MoE (whose router sees the padding tokens)
and a DeepSeek-V2 (MLA, attending absorbed in a bucket). The graphs themselves replay on CUDA:
tests/model/test_llama_cuda.py."""
from __future__ import annotations

import bisect

import pytest
import torch

from appliance.model import ForwardBatch, ModelRunner
from appliance.model.extend_graph import (DEFAULT_TOKEN_BUCKETS, VERIFY_GRAPH_LOGITS, fits,
                                          graph_logits, pad_extend_batch)
from helpers import greedy_generate, save_tiny_hf_model
from moe_checkpoints import save_tiny_moe
from test_deepseek import CONFIGS, save_tiny_deepseek
from test_verify_rows import PS, batch_of

PROMPTS = [list(range(7, 47)), [3, 1, 4, 1, 5], list(range(100, 123))]
MAX_ROWS, MAX_LOGITS = 4, 16


@pytest.fixture(scope="module", params=["llama", "llama-fp8-kv", "qwen3-moe", "deepseek-v2"])
def runner(request, tmp_path_factory) -> ModelRunner:
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llama-fp8-kv":   # a bucket's decode rows take the decode launch
        save_tiny_hf_model(folder, "llama", seed=3)
        return ModelRunner(str(folder), kv_num_pages=64, page_size=PS,
                           kv_dtype=torch.float8_e4m3fn)
    if request.param == "llama":
        save_tiny_hf_model(folder, "llama", seed=3)
    elif request.param == "deepseek-v2":
        version, over = CONFIGS["v2-noqlora"]
        save_tiny_deepseek(folder, version, seed=3, **over)
    else:
        save_tiny_moe(folder, "qwen3-moe")
    return ModelRunner(str(folder), kv_num_pages=64, page_size=PS)


def padded_logits(forward, batch: ForwardBatch) -> torch.Tensor:
    """The step's logits from `forward`, run in the smallest bucket that holds it."""
    tokens = DEFAULT_TOKEN_BUCKETS[bisect.bisect_left(DEFAULT_TOKEN_BUCKETS, batch.num_tokens)]
    assert fits(batch, tokens, MAX_ROWS, MAX_LOGITS, batch.page_table.shape[1])
    padded = pad_extend_batch(batch, tokens, MAX_ROWS, MAX_LOGITS)
    assert padded.num_decode == 0 and padded.num_tokens == tokens
    return forward(padded)[: batch.num_logits]


def check_padded_step(runner: ModelRunner, batch: ForwardBatch, want: torch.Tensor,
                      forward=None) -> None:
    """The padded step's logits are `want`'s, and it writes its own tokens' cache slots (the
    same K/V again, up to rounding: the CPU picks its GEMM by row count) and no other."""
    before = [c.clone() for layer in runner.kv_caches for c in layer]
    got = padded_logits(forward or runner.forward, batch)
    # 1e-4: MLA's decode rows take the extend kernel in a bucket, summing in another order
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    own = torch.zeros(before[0].shape[0], dtype=torch.bool)
    own[batch.slot_mapping.long()] = True
    for old, new in zip(before, (c for layer in runner.kv_caches for c in layer)):
        assert torch.equal(old[~own], new[~own]), "the padding wrote a cache slot"
        # an FP8 cache: a last-bit difference may round a value to the next e4m3 step (2^-3)
        tol = 2.0 ** -3 if old.element_size() == 1 else 1e-5
        torch.testing.assert_close(old[own].float(), new[own].float(), rtol=tol, atol=tol)


def test_every_step_of_a_greedy_run_gives_its_logits_padded(runner):
    forward, kinds = runner.forward, set()

    def both(batch: ForwardBatch) -> torch.Tensor:
        want = forward(batch)
        check_padded_step(runner, batch, want, forward)   # rewrites the same K/V: the cache is as it was
        kinds.add("decode" if batch.num_decode == batch.num_rows else
                  "prefill" if batch.num_decode == 0 else "mixed")
        return want

    runner.forward = both
    try:
        greedy_generate(runner, PROMPTS, 4, chunk=16, admit_per_step=1)
    finally:
        del runner.forward
    assert kinds == {"decode", "prefill", "mixed"}


def test_a_step_with_verify_rows_gives_every_logit_padded(runner):
    a, b = [5, 9, 33, 7, 100, 21, 3, 44, 12], [8, 8, 8, 17, 90]
    pages = {"a": [10, 11, 12, 13], "b": [14, 15], "c": [16, 17, 18, 19]}
    runner.forward(batch_of([(a, 0, pages["a"]), (b, 0, pages["b"])], 0, None))
    rows = [([60], len(b), pages["b"]), ([50, 51, 52, 53], len(a), pages["a"]),
            (list(range(10, 16)), 0, pages["c"])]
    step = batch_of(rows, num_decode=1, logit_index=[0, 1, 2, 3, 4, 10])
    check_padded_step(runner, step, runner.forward(step))


def test_a_one_token_row_after_a_longer_row_is_not_taken_for_a_decode(runner):
    """In a bucket the decode rows are found on the device (`graph_decode_mask`): one token,
    and token b of row b. A chunk of one token behind a longer row is an extend row; a
    bucket's padding row is none of the step's."""
    a, b = [5, 9, 33, 7, 100, 21, 3, 44, 12], [8, 8, 8, 17, 90]
    pages = {"a": [20, 21, 22, 23], "b": [24, 25], "c": [26, 27]}
    runner.forward(batch_of([(a, 0, pages["a"]), (b, 0, pages["b"])], 0, None))
    rows = [([60], len(b), pages["b"]), ([50, 51, 52], len(a), pages["a"]),
            ([70, 71, 72, 73, 74], 0, pages["c"]), ([61], len(a) + 3, pages["a"])]
    step = batch_of(rows, num_decode=1, logit_index=None)
    padded = pad_extend_batch(step, 16, MAX_ROWS, MAX_LOGITS)
    assert padded.graph_decode_mask.tolist() == [True, False, False, False, False]
    assert padded.graph_decode_lens.tolist() == [len(b) + 1, 0, 0, 0, 0]
    check_padded_step(runner, step, runner.forward(step))


def test_a_bucket_holds_a_step_only_with_room_for_its_padding():
    def step(tokens: list[int], logits: list[int] | None = None) -> ForwardBatch:
        rows = [([1] * n, 0, [i]) for i, n in enumerate(tokens)]
        return batch_of(rows, 0, logits)

    assert fits(step([3, 2]), 8, MAX_ROWS, MAX_LOGITS, 1)          # rows 0-1, padding row 4
    assert fits(step([2, 2, 2, 2]), 8, MAX_ROWS, MAX_LOGITS, 1)    # 4 rows: the 5th pads
    assert not fits(step([1] * 5), 8, MAX_ROWS, MAX_LOGITS, 1)     # more rows than max_rows
    assert not fits(step([3, 3, 3]), 8, MAX_ROWS, MAX_LOGITS, 1)   # 9 tokens
    assert fits(step([2, 2, 2, 2]), 8, 8, 8, 1)                    # 8 rows: room to pad
    assert fits(step([1] * 8), 8, 8, 8, 1)                         # a full bucket: no padding
    assert fits(step([1] * 7), 8, 7, 8, 1)                         # 7 rows + the padding row
    assert not fits(step([4, 4], list(range(8))), 8, MAX_ROWS, 4, 1)  # 8 logits, 4 rows of them
    assert not fits(step([3, 2]), 8, MAX_ROWS, MAX_LOGITS, 0)      # page table too wide


def test_with_drafts_the_graphs_hold_a_logits_row_per_verify_token():
    """16 rows of 8 drafts (144 logits) fit the graphs of a daemon of 64 running requests
    once it speculates; without drafts a logits row a row, as before; capped for the LM head
    of large buckets."""
    assert graph_logits(64, 0) == 64 and graph_logits(256, 0) == 256
    assert graph_logits(64, 8) == min(64 * 9, VERIFY_GRAPH_LOGITS) >= 16 * 9
    assert graph_logits(4, 3) == 16
    assert graph_logits(1024, 8) == 1024                  # never fewer than the rows
    rows = [([1] * 9, 0, [3 * i, 3 * i + 1, 3 * i + 2]) for i in range(16)]
    verify = batch_of(rows, 0, list(range(16 * 9)))        # every token a logits row
    assert not fits(verify, 192, 64, 64, 3)
    assert fits(verify, 192, 64, graph_logits(64, 8), 3)


def test_extend_graphs_serve_models_whose_attention_reads_its_layout_on_the_device(
        runner, monkeypatch):
    from appliance.model.runner import use_extend_graphs

    assert use_extend_graphs(runner._kv_layers)                        # GQA and MLA
    monkeypatch.setenv("TOKENSPEED_EXTEND_GRAPHS", "0")
    assert not use_extend_graphs(runner._kv_layers)


def test_mla_replays_only_the_steps_it_attends_absorbed(runner):
    """A graph bucket attends absorbed; a step whose chunk would attend decompressed (its
    keys gathered by an index sized on the host) runs eagerly, and is then exact."""
    from appliance.model.layers.mla import MLAttention
    from appliance.model.runner import replays_extend

    layers = runner._kv_layers
    long_chunk = batch_of([(list(range(3, 93)), 0, list(range(24)))], 0, None)   # 90 new tokens
    short = batch_of([([5, 6, 7], 0, [30])], 0, None)
    if not isinstance(layers[0], MLAttention):
        assert replays_extend(layers, long_chunk) and replays_extend(layers, short)
        return
    assert layers[0].decompress_extend(long_chunk) and not replays_extend(layers, long_chunk)
    assert replays_extend(layers, short)
    padded = pad_extend_batch(long_chunk, 96, MAX_ROWS, MAX_LOGITS)
    assert padded.graph_bucket and not layers[0].decompress_extend(padded)
    # both paths give the same logits for the chunk (the decompressed one is what runs eagerly)
    check_padded_step(runner, long_chunk, runner.forward(long_chunk))
