"""apply_token_bitmask against llguidance's own numpy version; apply_penalties against HF
transformers' RepetitionPenaltyLogitsProcessor and OpenAI's presence/frequency formula."""
import numpy as np
import pytest
import torch
from llguidance.numpy import apply_token_bitmask_inplace
from transformers import RepetitionPenaltyLogitsProcessor

import kernels


@pytest.mark.parametrize("vocab", [31, 32, 100, 1027])
def test_token_bitmask_matches_llguidance(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g)
    rows = torch.tensor([3, 0, 4])
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31, (3, words), generator=g, dtype=torch.int64).to(torch.int32)
    expected = logits[rows].numpy().copy()
    apply_token_bitmask_inplace(expected, bitmask.numpy())
    out = logits.clone()
    kernels.select("apply_token_bitmask", device="cpu", dtype=torch.float32)(out, bitmask, rows)
    assert np.array_equal(out[rows].numpy(), expected)
    untouched = [1, 2]
    assert torch.equal(out[untouched], logits[untouched])


def test_penalties_match_transformers_and_openai():
    vocab, g = 60, torch.Generator().manual_seed(1)
    logits = torch.randn(4, vocab, generator=g) * 3
    prompts = [[1, 2, 2, 7], [5], [9, 9, 30]]
    generated = [[7, 8, 8, 8], [], [30, 31, 59]]
    rows, slots = torch.tensor([2, 0, 3]), torch.tensor([1, 0, 2])
    prompt_seen = torch.zeros(3, vocab, dtype=torch.bool)
    counts = torch.zeros(3, vocab, dtype=torch.int32)
    for slot, (p, out) in zip(slots.tolist(), zip(prompts, generated)):
        prompt_seen[slot, p] = True
        for t in out:
            counts[slot, t] += 1
    repetition = torch.tensor([1.3, 1.0, 0.8])
    presence, frequency = torch.tensor([0.0, 0.5, -0.4]), torch.tensor([0.0, 0.25, 1.5])
    out = logits.clone()
    kernels.select("apply_penalties", device="cpu", dtype=torch.float32)(
        out, rows, slots, prompt_seen, counts, repetition, presence, frequency)
    for i, (row, slot) in enumerate(zip(rows.tolist(), slots.tolist())):
        ids = torch.tensor([prompts[i] + generated[i]])
        expected = RepetitionPenaltyLogitsProcessor(float(repetition[i]))(ids, logits[row:row + 1].clone())[0]
        c = torch.bincount(torch.tensor(generated[i], dtype=torch.int64), minlength=vocab).float()
        expected = expected - frequency[i] * c - presence[i] * (c > 0).float()
        assert torch.allclose(out[row], expected, atol=1e-6)
    assert torch.equal(out[1], logits[1])
