"""Greedy tokens of ModelRunner == HF transformers' generate, on tiny random checkpoints."""
from __future__ import annotations

import pytest

from appliance.model import ModelRunner
from helpers import assert_each_prompt_alone, greedy_generate, hf_greedy, save_tiny_hf_model

PROMPTS = [[5, 9, 33, 7, 100, 21, 3], [8, 8, 8], list(range(10, 40)), [151, 2, 77, 0, 64]]
MAX_NEW = 8


@pytest.fixture(scope="module", params=[
    ("llama", {}),                                   # llama3 rope scaling
    ("qwen3", {}),                                   # q/k norm, head_dim != hidden/heads
    ("qwen2", {}),                                   # q/k/v bias
    ("llama", {"tie_word_embeddings": True, "rope_parameters":
               {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}),
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 128}}),
], ids=["llama3-rope", "qwen3-qknorm", "qwen2-bias", "tied-linear-rope", "qwen2-yarn"])
def checkpoint(request, tmp_path_factory):
    family, over = request.param
    folder = save_tiny_hf_model(tmp_path_factory.mktemp(request.node.callspec.id if hasattr(
        request.node, "callspec") else family), family, seed=7, **over)
    return folder, hf_greedy(folder, PROMPTS, MAX_NEW)


def test_one_at_a_time(checkpoint):
    folder, ref = checkpoint
    assert_each_prompt_alone(folder, PROMPTS, ref, MAX_NEW)


def test_mixed_batch_chunked_prefill(checkpoint):
    """All prompts in flight together: later ones prefill in chunks of 5 tokens while earlier
    ones decode, so batches mix decode rows and prefill chunks over a cached prefix."""
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    seen = []
    forward = runner.forward
    runner.forward = lambda b: seen.append(b) or forward(b)
    assert greedy_generate(runner, PROMPTS, MAX_NEW, chunk=5, admit_per_step=1) == ref
    # the driver really mixed decode rows with prefill chunks that extend a cached prefix
    assert any(0 < b.num_decode < b.num_rows and int(b.prefix_lens[b.num_decode:].max()) > 0
               for b in seen)


def test_batched_prefill_then_decode(checkpoint):
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=16)
    assert greedy_generate(runner, PROMPTS, MAX_NEW) == ref
