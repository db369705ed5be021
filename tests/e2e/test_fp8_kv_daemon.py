"""The daemon serving with an FP8 KV cache (`--set kv.dtype=fp8_e4m3`) through the HTTP API:
the tiny model's greedy tokens for prompts sent alone and all at once (chunked prefill) equal
a ModelRunner's with the same FP8 cache in this process (the torch reference, CPU), start-up
says the pool's dtype, and an MLA model refuses the setting by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from daemon_process import launch_daemon, serve_alone_and_together

from appliance.model import ForwardBatch, ModelRunner
from appliance.model.tiny import ensure_tiny_checkpoint

pytestmark = pytest.mark.slow  # spawns processes / > 5 s: skipped by -m 'not slow'

PROMPTS = [[5, 9, 33, 7, 100, 21, 3], list(range(10, 50)), [900, 2, 77, 0, 64] * 5]
MAX_NEW = 12


def _runner_greedy(folder: Path, prompt: list[int], max_new: int) -> list[int]:
    """Greedy tokens of one prompt (one prefill, then decodes) on an FP8-cache runner."""
    runner = ModelRunner(str(folder), kv_num_pages=16, page_size=16,
                         kv_dtype=torch.float8_e4m3fn)
    tokens, i32 = list(prompt), dict(dtype=torch.int32)
    done = 0
    while len(tokens) < len(prompt) + max_new:
        new = tokens[done:]
        pos = list(range(done, len(tokens)))
        logits = runner.forward(ForwardBatch(
            input_ids=torch.tensor(new, **i32), positions=torch.tensor(pos, **i32),
            query_start=torch.tensor([0, len(new)], **i32),
            prefix_lens=torch.tensor([done], **i32), seq_lens=torch.tensor([len(tokens)], **i32),
            page_table=torch.tensor([list(range(16))], **i32),
            slot_mapping=torch.tensor(pos, **i32), num_decode=int(done > 0)))
        done = len(tokens)
        tokens.append(int(logits[0].argmax()))
    return tokens[len(prompt):]


def test_serves_with_an_fp8_cache(tmp_path):
    tiny = ensure_tiny_checkpoint(tmp_path / "tiny")
    want = [_runner_greedy(tiny, p, MAX_NEW) for p in PROMPTS]
    alone, together = serve_alone_and_together(tmp_path, tiny, PROMPTS, MAX_NEW,
                                               "kv.dtype=fp8_e4m3")
    assert alone == want
    # prefilled in chunks of 16 beside other rows: the same keys, summed in other orders
    same = sum(a == b for x, y in zip(together, want) for a, b in zip(x, y))
    assert same >= 0.9 * len(PROMPTS) * MAX_NEW, (together, want)
    log = next(tmp_path.glob("daemon-*.log")).read_text()
    assert re.search(r"KV cache \d+ pages of 16 tokens \(\d+ tokens\), fp8_e4m3, ", log), log


def test_mla_model_refuses_fp8_cache(tmp_path):
    daemon = launch_daemon(tmp_path, "model.preset=deepseek-v2-lite", "model.load_format=dummy",
                           "kv.dtype=fp8_e4m3")
    code = daemon.proc.wait(240)
    log = daemon.log.read_text()
    assert code != 0 and "kv.dtype: fp8_e4m3 is not supported" in log, log
    assert "Traceback" not in log, log
