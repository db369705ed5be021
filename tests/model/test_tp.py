"""Tensor parallelism over torch.distributed gloo: TP=2 and TP=4 decode the same greedy
tokens as TP=1 (which test_hf_equality ties to HF transformers). Each TP size is one spawn
running several models, to keep the suite fast on two cores."""
from __future__ import annotations

import pytest

from appliance.model import ModelRunner, ModelSource
from helpers import greedy_generate, hf_greedy, run_tp, save_tiny_hf_model

pytestmark = pytest.mark.slow  # spawns processes / > 5 s: skipped by -m 'not slow'

PROMPTS = [[5, 9, 33, 7, 100, 21, 3], [8, 8, 8], list(range(10, 40))]
MAX_NEW = 6
KV = dict(kv_num_pages=64, page_size=4)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    # vocab 150: not a multiple of 4, so the vocab-parallel tables carry padding rows;
    # 2 kv heads: at TP=4 each kv head is replicated on two ranks
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("llama_tp"), "llama", seed=3,
                                  vocab_size=150))


@pytest.fixture(scope="module")
def qwen3_tied_folder(tmp_path_factory):
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("qwen3_tp"), "qwen3", seed=5,
                                  tie_word_embeddings=True))


def _tp1(model_cfg) -> list[list[int]]:
    return greedy_generate(ModelRunner(model_cfg, **KV), PROMPTS, MAX_NEW, chunk=5,
                           admit_per_step=1)


def test_tp2_matches_tp1(llama_folder, qwen3_tied_folder, tmp_path):
    # dummy weights are seeded per checkpoint tensor, so every TP size sees the same model
    dummy = ModelSource(preset="tiny-llama", load_format="dummy", seed=11)
    jobs = [(llama_folder, KV), (qwen3_tied_folder, KV), (dummy, KV)]
    refs = [_tp1(cfg) for cfg, _ in jobs]
    assert refs[0] == hf_greedy(llama_folder, PROMPTS, MAX_NEW)
    for ref, ranks in zip(refs, run_tp(2, jobs, PROMPTS, MAX_NEW, tmp_path)):
        assert [r["tokens"] for r in ranks] == [ref, ref]
        assert [r["num_pages"] for r in ranks] == [64, 64]  # asked 64, 65: all take the min


def test_tp4_matches_tp1(llama_folder, tmp_path):
    ref = _tp1(llama_folder)
    ranks, = run_tp(4, [(llama_folder, KV)], PROMPTS, MAX_NEW, tmp_path)
    assert [r["tokens"] for r in ranks] == [ref] * 4
    assert [r["num_pages"] for r in ranks] == [64] * 4
