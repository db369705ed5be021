"""In-place edits of some rows of a logits matrix before sampling: a token bitmask (grammar
constraints) and repetition / presence / frequency penalties; and the penalties' statistics
updated with the sampled tokens (`count_tokens`).

Both take the rows to edit as a device index tensor, so a batch where few rows ask pays for
those rows only, and neither reads a value back to the host (no sync; CUDA-graph safe). Plain
torch serves CUDA too; a Triton version comes only with a measured need.
"""
from __future__ import annotations

import torch

from kernels.registry import register


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask [R, W] int32, bit j of word w = token 32*w + j -> allowed [R, vocab] bool."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)          # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1                                 # [R, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()                  # [R, V]


@register("apply_token_bitmask", backend="torch", priority=0)
def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] f32; bitmask [R, ceil(V/32)] int32; rows [R] int64 (distinct): the tokens
    of row rows[r] whose bit is 0 in bitmask[r] become -inf."""
    allowed = unpack_bitmask(bitmask, logits.shape[1])                           # [R, V]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


@register("apply_penalties", backend="torch", priority=0)
def apply_penalties(logits: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                    prompt_seen: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> None:
    """logits [B, V] f32; rows, slots [R] int64; prompt_seen [S, V] bool (the token is in the
    prompt); output_counts [S, V] int32 (times generated); repetition, presence, frequency [R]
    f32. Row rows[r] reads state slot slots[r]:
    - repetition (HF's RepetitionPenaltyLogitsProcessor), over prompt and generated tokens:
      a seen token's logit l becomes l * p if l < 0, else l / p;
    - presence and frequency (OpenAI), over generated tokens: l -= presence * (count > 0)
      + frequency * count."""
    l = logits[rows]                                                             # [R, V]
    counts = output_counts[slots]                                                # [R, V]
    seen = prompt_seen[slots] | (counts > 0)
    p = repetition.unsqueeze(1)
    l = torch.where(seen, torch.where(l < 0, l * p, l / p), l)
    l = l - presence.unsqueeze(1) * (counts > 0) - frequency.unsqueeze(1) * counts
    logits[rows] = l


@register("count_tokens", backend="torch", priority=0)
def count_tokens(output_counts: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
                 tokens: torch.Tensor, places: torch.Tensor,
                 accepted: torch.Tensor | None = None, chains: torch.Tensor | None = None) -> None:
    """output_counts [S, V] int32, in place: the token sampled at logits row rows[r] (tokens [N]
    int32) is counted once more in state slot slots[r] ([R] int64) where places[r] ([R] int32)
    is below its limit: accepted[chains[r]] (accepted [C] int32, chains [R] int64: a verify
    step's chains and how many tokens each emits, places[r] the row's place in its chain), or
    1 without `accepted` (a plain step: place 0 counts, 1 does not). Slots may repeat (the rows
    of one chain)."""
    limit = accepted[chains] if accepted is not None else 1
    times = (places < limit).to(torch.int32)                                     # [R]
    output_counts.index_put_((slots, tokens[rows].long()), times, accumulate=True)
