"""GPT-OSS through the HTTP API of the real daemon: greedy tokens == transformers' `generate`
(fp32, CPU) for prompts run alone and all at once, prefilled in chunks of 16 tokens by the
C++ scheduler, with contexts several windows long; TP=2 (gloo, parallel.moe tp and ep) too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from daemon_process import serve_alone_and_together

pytestmark = pytest.mark.slow  # spawns processes / > 5 s: skipped by -m 'not slow'

PROMPTS = [[5, 9, 33, 7, 100, 21, 3], [8, 8, 8], list(range(10, 50)), [900, 2, 77, 0, 64] * 5]
MAX_NEW = 10


def _save_tiny_gpt_oss(folder: Path, tokenizer_folder: Path) -> Path:
    """A seeded random GptOssForCausalLM (window 6, sinks, 4 experts top-2, YaRN) with the
    tiny model's tokenizer."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=6, max_position_embeddings=512,
        initializer_range=0.1, swiglu_limit=1.0,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "rope_theta": 150000.0,
                         "original_max_position_embeddings": 128},
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, list[list[int]]]:
    """(folder, transformers' greedy tokens of each prompt)."""
    import os

    import transformers

    from appliance.model.tiny import ensure_tiny_checkpoint

    cache = Path(os.environ.get("TOKENSPEED_CACHE", tmp_path_factory.mktemp("cache")))
    tiny = Path(ensure_tiny_checkpoint(cache / "models" / "tiny-llama"))
    folder = _save_tiny_gpt_oss(tmp_path_factory.mktemp("tiny-gpt-oss"), tiny)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                 do_sample=False, pad_token_id=0, eos_token_id=None,
                                 attention_mask=torch.ones_like(ids))
        ref.append(out[0, len(prompt):].tolist())
    return str(folder), ref


def test_greedy_equals_transformers(checkpoint, tmp_path):
    folder, ref = checkpoint
    alone, together = serve_alone_and_together(tmp_path, folder, PROMPTS, MAX_NEW)
    assert alone == ref
    assert together == ref


@pytest.mark.parametrize("moe", ["tp", "ep"])
def test_tp2_equals_transformers(checkpoint, tmp_path, moe):
    folder, ref = checkpoint
    alone, together = serve_alone_and_together(tmp_path, folder, PROMPTS, MAX_NEW,
                                               "parallel.tp_size=2", f"parallel.moe={moe}")
    assert alone == ref and together == ref
