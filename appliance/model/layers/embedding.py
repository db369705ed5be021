"""Vocab-parallel token embedding and LM head.

The vocabulary is split in ceil(V/n) rows per rank (the last rank's tail padded with
zeros). The embedding looks up only the ids it owns and writes zeros elsewhere, so its
output is Partial; the LM head produces this rank's slice of the logits, Shard(-1), and
the compiler gathers them. With tied embeddings the head reuses the embedding's weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from appliance.model.layers.linear import RegistryMatmul
from appliance.model.layers.norm import RMSNorm
from appliance.model.placement import (ParallelLayout, Partial, Placed, Replicate, Shard,
                                       WeightSharding, WeightSource, vocab_extent)


class VocabParallelEmbedding(Placed):
    input_placement = None  # token ids

    def __init__(self, vocab_size: int, hidden_size: int, layout: ParallelLayout,
                 group: str = "attn_tp") -> None:
        super().__init__()
        n, r = layout.size(group), layout.rank_in(group)
        self.vocab_size, self.hidden_size, self.group = vocab_size, hidden_size, group
        self.start, self.length, per = vocab_extent(vocab_size, r, n)
        self.weight = nn.Parameter(torch.empty(per, hidden_size), requires_grad=False)
        self.sharded = n > 1
        self.output_placement = Partial(group) if self.sharded else Replicate(group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, H] (this rank's rows; zeros for ids another rank owns)
        if not self.sharded:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start                                   # [T]
        mine = (local >= 0) & (local < self.length)                      # [T]
        out = F.embedding(torch.where(mine, local, torch.zeros_like(local)), self.weight)
        return out * mine.unsqueeze(-1).to(out.dtype)                    # [T, H]

    def weight_shardings(self, prefix: str) -> list[WeightSharding]:
        return [WeightSharding(f"{prefix}.weight", "vocab", self.group, (
            WeightSource(f"{prefix}.weight", (self.vocab_size, self.hidden_size)),), dim=0)]


class ParallelLMHead(Placed):
    """logits[T, V_local] = x[T, H] @ W_local.T; W is the embedding's when tied."""

    def __init__(self, vocab_size: int, hidden_size: int, layout: ParallelLayout,
                 group: str = "attn_tp", tied_to: VocabParallelEmbedding | None = None) -> None:
        super().__init__()
        n, r = layout.size(group), layout.rank_in(group)
        self.vocab_size, self.hidden_size, self.group = vocab_size, hidden_size, group
        _, _, per = vocab_extent(vocab_size, r, n)
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(per, hidden_size), requires_grad=False)
        self.input_placement = Replicate(group)
        self.output_placement = Shard(-1, group) if n > 1 else Replicate(group)
        self._matmul = RegistryMatmul()
        self.bias = None
        self.folds_norm = True  # forward_normed: the final norm inside the head's op
        self.fold_kind = "head"  # folds by default if in norm.FOLDED_KINDS

    @property
    def scale_target(self) -> nn.Module | None:
        """What takes the final norm's scale (norm.SCALED_KINDS): the head, unless the
        embedding shares its weight."""
        return None if self.tied else self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H] -> [B, V_local]
        return self._matmul(x, self.weight)

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward over norm(x, residual), the norm inside the head's op -> (logits,
        residual)."""
        return norm.into(self, x, residual)

    def weight_shardings(self, prefix: str) -> list[WeightSharding]:
        if self.tied:
            return []
        return [WeightSharding(f"{prefix}.weight", "vocab", self.group, (
            WeightSource(f"{prefix}.weight", (self.vocab_size, self.hidden_size)),), dim=0)]
