"""spec_accept in Triton: one program per row, one launch (the torch reference takes six)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.registry import register
from kernels.triton.common import PRIORITY, on_cuda, per_batch
from kernels.triton.pdl import pdl_begin, pdl_launch

BLOCK = 16  # logits rows looked at per iteration: a row is its next token + up to ~8 drafts


@triton.jit(**per_batch(pointers=("Tokens", "Drafts", "Start", "Counts")))
def _spec_accept_kernel(Tokens, Drafts, Start, Counts, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0)
    lo = tl.load(Start + row)
    hi = tl.load(Start + row + 1)
    first = hi - lo                                    # no mismatch seen yet
    for base in range(lo, hi, BLOCK):
        offs = base + tl.arange(0, BLOCK)
        live = offs < hi
        tok = tl.load(Tokens + offs, mask=live, other=0)
        draft = tl.load(Drafts + offs, mask=live, other=0)
        local = tl.where(live & (tok != draft), offs - lo, hi - lo)
        first = tl.minimum(first, tl.min(local, 0))
    tl.store(Counts + row, (first + 1).to(tl.int32))


@register("spec_accept", backend="triton", priority=PRIORITY, supports=on_cuda)
def spec_accept(tokens: torch.Tensor, drafts: torch.Tensor,
                logit_start: torch.Tensor) -> torch.Tensor:
    """tokens, drafts: [N] int32; logit_start: [B+1] int32 -> counts [B] int32."""
    rows = logit_start.shape[0] - 1
    counts = torch.empty(rows, dtype=torch.int32, device=tokens.device)
    if rows > 0:
        _spec_accept_kernel[(rows,)](tokens.int().contiguous(), drafts.int().contiguous(),
                                     logit_start.int().contiguous(), counts, BLOCK=BLOCK,
                                     **pdl_launch(tokens.device))
    return counts
