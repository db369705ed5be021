"""TP=2 and TP=4 (gloo on CPU) produce the same greedy tokens as TP=1, through the HTTP API."""

from __future__ import annotations

import httpx
import pytest
from daemon_process import start_daemon

pytestmark = pytest.mark.slow  # spawns processes / > 5 s: skipped by -m 'not slow'

PROMPTS = ["The quick brown fox", "def quicksort(xs):", "Once upon a time, in a land far away,"]


def _greedy_texts(daemon) -> list[str]:
    texts = []
    with httpx.Client(base_url=daemon.base_url, timeout=120) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        for prompt in PROMPTS:
            body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 12
            texts.append(response.json()["choices"][0]["text"])
    return texts


def _run(folder, *overrides: str) -> list[str]:
    daemon = start_daemon(folder, *overrides)
    try:
        return _greedy_texts(daemon)
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()


@pytest.fixture(scope="module")
def tp1_llama(tmp_path_factory) -> list[str]:
    return _run(tmp_path_factory.mktemp("tp1"))


@pytest.mark.parametrize("tp", [2, 4])
def test_llama_tp_matches_tp1(tp, tp1_llama, tmp_path):
    assert _run(tmp_path, f"parallel.tp_size={tp}") == tp1_llama


def _save_tiny_deepseek_v3(folder, tokenizer_folder) -> str:
    """A seeded random DeepSeek-V3 checkpoint (MLA + sigmoid-routed MoE) with the tiny tokenizer."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=1000, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=4,
        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():  # wider than HF's init, so routing and logits are far from ties
        for p in model.parameters():
            p.normal_(0.0, 0.25) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def deepseek_checkpoint(tmp_path_factory) -> str:
    import os
    from pathlib import Path

    from appliance.model.tiny import ensure_tiny_checkpoint

    cache = Path(os.environ.get("TOKENSPEED_CACHE", tmp_path_factory.mktemp("cache")))
    tiny = ensure_tiny_checkpoint(cache / "models" / "tiny-llama")
    return _save_tiny_deepseek_v3(tmp_path_factory.mktemp("tiny-deepseek-v3"), Path(tiny))


@pytest.fixture(scope="module")
def tp1_deepseek(deepseek_checkpoint, tmp_path_factory) -> list[str]:
    return _run(tmp_path_factory.mktemp("tp1ds"), f"model.path={deepseek_checkpoint}")


@pytest.mark.parametrize("tp", [2, 4])
def test_deepseek_tp_matches_tp1(tp, deepseek_checkpoint, tp1_deepseek, tmp_path):
    assert _run(tmp_path, f"model.path={deepseek_checkpoint}", f"parallel.tp_size={tp}") == tp1_deepseek


def test_tp2_verifies_drafts_on_every_rank(tmp_path):
    """Ranks > 0 run the same verify rows (num_draft travels with the plan): speculative
    output at TP=2 equals the opted-out output on the same daemon."""
    code = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n" * 2
    daemon = start_daemon(tmp_path, "model.preset=tiny-llama", "parallel.tp_size=2",
                          "speculative.method=ngram")
    try:
        with httpx.Client(base_url=daemon.base_url, timeout=120) as http:
            outputs = []
            for speculative in (True, False):
                body = {"prompt": code, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True, "speculative": speculative}
                response = http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                outputs.append(response.json()["choices"][0]["token_ids"])
            spec = http.get("/stats").json()["speculative"]
        assert outputs[0] == outputs[1]
        assert spec["verify_rows"] > 0 and spec["accepted_tokens"] > 0
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
