"""Speculative verification's acceptance: how much of each row's draft chain the target kept.

Row b of a verify step has logits rows `logit_start[b]:logit_start[b+1]` (its next token,
then one per draft). `tokens` holds what the target sampled at each of them (the `sample` op,
randomness a pure function of (seed, position)), `drafts` the draft that position proposed
(-1 at a row's last position: nothing to check there). A row emits its tokens up to and
including the first position where they differ from the draft: the accepted drafts plus one
token the target chose itself.

With deterministic drafts this is exact rejection sampling: the sampled token equals draft d
with probability p(d) (accept), and given it does not, it is distributed as p with d removed,
renormalized (the residual); the last position gives the bonus token from p. Greedy rows
(argmax) accept the longest prefix of drafts equal to the argmax. Either way the emitted
tokens are the ones sampling without speculation gives at the same positions.
"""
from __future__ import annotations

import torch

from kernels.registry import register


@register("spec_accept", backend="torch", priority=0)
def spec_accept(tokens: torch.Tensor, drafts: torch.Tensor,
                logit_start: torch.Tensor) -> torch.Tensor:
    """tokens, drafts: [N] int32; logit_start: [B+1] int32 -> counts [B] int32 (>= 1), no host
    sync (N is known from the shapes)."""
    n, rows = tokens.shape[0], logit_start.shape[0] - 1
    start = logit_start.long()                                                  # [B+1]
    row = torch.repeat_interleave(torch.arange(rows, device=tokens.device),
                                  start.diff(), output_size=n)                  # [N]
    local = torch.arange(n, device=tokens.device) - start[row]                  # [N]
    missed = torch.where(tokens != drafts, local, torch.full_like(local, n))    # [N]
    first = torch.full((rows,), n, dtype=torch.long, device=tokens.device)
    first = first.scatter_reduce(0, row, missed, "amin")                         # [B]
    return (first + 1).to(torch.int32)
