"""Qwen3-MoE and GLM-4.5 MoE through the HTTP API of the live daemon (`tokenspeed up --set
model.path=...`, the real engine and C++ scheduler on the CPU): greedy completions of token-id
prompts equal HF transformers' generate token for token, each prompt alone and all of them at
once; `scheduler.max_batch_tokens=16` cuts the 30-token prompt into chunks and mixes prefill
chunks with decode rows. GLM once more over two gloo ranks with whole experts per rank
(`parallel.moe=ep`)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import hf_greedy
from moe_checkpoints import MAX_NEW, PROMPTS, save_tiny_moe, with_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from daemon_process import serve_alone_and_together  # noqa: E402  (tests/e2e: the daemon launcher)

pytestmark = pytest.mark.slow  # spawns the daemon: skipped by -m 'not slow'


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    import os

    from appliance.model.tiny import ensure_tiny_checkpoint

    cache = Path(os.environ.get("TOKENSPEED_CACHE", tmp_path_factory.mktemp("cache")))
    return Path(ensure_tiny_checkpoint(cache / "models" / "tiny-llama"))


@pytest.mark.parametrize("name,overrides", [
    ("qwen3-moe", ()),
    ("glm-4.5-grouped", ()),
    ("glm-4.5-grouped", ("parallel.tp_size=2", "parallel.moe=ep")),
], ids=["qwen3-moe", "glm-4.5", "glm-4.5-tp2-ep"])
def test_http_greedy_matches_hf(name, overrides, tokenizer_folder, tmp_path):
    folder = with_tokenizer(save_tiny_moe(tmp_path / "model", name), tokenizer_folder)
    want = hf_greedy(folder, PROMPTS, MAX_NEW)
    alone, together = serve_alone_and_together(tmp_path, folder, PROMPTS, MAX_NEW, *overrides)
    assert alone == want
    assert together == want
