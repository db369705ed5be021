"""Speculative verification: one target step checks every verify row's chain of drafts.

A verify row runs its next token and its k drafts; the model returns logits at all 1 + k
tokens (`LogitLayout` says which). The sampler draws at each logits row as a plain decode at
that position would (`LogitLayout.per_logit_row`; the `sample` op: greedy, or temperature /
top-k / top-p with randomness a pure function of (seed, position)), and `Verifier.accept`
(`spec_accept`) keeps the drafts up to the first one the target did not sample, plus the token
it sampled there (after the last draft: the bonus token). The emitted tokens are the ones
sampling without speculation gives at the same positions, so greedy output is identical token
for token, and with temperature > 0 this is exact rejection sampling for deterministic drafts
(kernels/reference/spec_accept.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

import kernels
from appliance.engine.constraints import Grammars, StepBitmask, clear_unless_all
from appliance.engine.plan_arrays import PlanArrays
from appliance.engine.transfer import to_device_packed


@dataclass(frozen=True)
class LogitLayout:
    """The logits rows of a step with verify rows (host arrays; N = B + total drafts)."""

    index: np.ndarray  # [N] int32: the token (into the step's T) of each logits row
    start: np.ndarray  # [B+1] int32: plan row b owns logits rows start[b]:start[b+1]
    row: np.ndarray  # [N] int64: the plan row of each logits row
    local: np.ndarray  # [N] int64: each logits row's place in its row's chain (0: the first)
    drafts: np.ndarray  # [N] int32: the draft each logits row checks (-1: none, last of a row)
    positions: np.ndarray  # [N] int64: the position of the token each logits row samples

    @classmethod
    def of(cls, arrays: PlanArrays) -> LogitLayout:
        per_row = arrays.num_draft.astype(np.int64) + 1                       # [B]
        start = np.zeros(len(per_row) + 1, np.int64)
        np.cumsum(per_row, out=start[1:])
        row = np.repeat(np.arange(len(per_row)), per_row)                     # [N]
        local = np.arange(start[-1]) - start[row]                             # [N]
        # a plain row's one logits row is its last token; a verify row's are all its tokens
        index = arrays.query_start[1:].astype(np.int64)[row] - per_row[row] + local
        checks = local < arrays.num_draft[row]                                 # [N]
        following = arrays.input_ids[np.minimum(index + 1, len(arrays.input_ids) - 1)]
        return cls(index=index.astype(np.int32), start=start.astype(np.int32), row=row, local=local,
                   drafts=np.where(checks, following, -1).astype(np.int32),
                   positions=arrays.positions[index].astype(np.int64) + 1)

    def per_logit_row(self, arrays: PlanArrays) -> PlanArrays:
        """The step as the sampler reads it (`Sampler.prepare`: `seq_lens`, `sample`), one row
        per logits row: each samples the token at its own position, as a plain decode of the
        context up to it would (the randomness is a function of (seed, position))."""
        return dataclasses.replace(arrays, seq_lens=self.positions.astype(np.int32),
                                   sample=arrays.sample[self.row])

    def drafts_before(self) -> tuple[np.ndarray, np.ndarray]:
        """(logits rows [P] int64, tokens [P] int64): each logits row paired with every draft
        of its chain before it, the tokens a plain decode at its position would already have
        generated (a penalty counts them; logits row j of a chain gets drafts 0 .. j-1)."""
        rows = np.repeat(np.arange(len(self.row)), self.local)                 # [P]
        nth = np.arange(len(rows)) - np.repeat(np.cumsum(self.local) - self.local, self.local)
        return rows, self.drafts[self.start[self.row[rows]] + nth].astype(np.int64)


class Verifier:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._accept = kernels.select("spec_accept", device=device.type, dtype=torch.float32)

    def accept(self, tokens: torch.Tensor, layout: LogitLayout
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [N] int32 (sampled at every logits row, on the device) -> (counts [B] int32,
        each row's first token [B] int32), no host sync: row b emits
        tokens[start[b] : start[b] + counts[b]]."""
        drafts, start = to_device_packed(
            [torch.from_numpy(layout.drafts), torch.from_numpy(layout.start)], self.device)
        return self._accept(tokens, drafts, start), tokens[start[:-1].long()]


def verify_bitmask(constrained: list[tuple[int, int]], held_back: dict[int, np.ndarray],
                   layout: LogitLayout, grammars: Grammars) -> StepBitmask | None:
    """The grammar masks of a verify step's constrained logits rows ((logits row, rid) pairs):
    a plain row's at its matcher's state; a verify row's at the state after each of its drafts
    (`Grammars.draft_bitmask`), so a draft the grammar forbids cannot be sampled, hence is
    rejected. Logits rows past such a draft (their tokens are discarded) repeat the last mask.
    `held_back` (logits row -> the stop ids min_tokens forbids there) is folded in as
    `Grammars.bitmask` folds it into a plain row's mask."""
    plain, rows, masks = [], [], []
    draft_masks: dict[int, tuple[np.ndarray, int]] = {}
    for logit_row, rid in constrained:
        b = int(layout.row[logit_row])
        first, end = int(layout.start[b]), int(layout.start[b + 1])
        if end - first == 1:
            plain.append((logit_row, rid))
            continue
        if rid not in grammars:
            continue
        if b not in draft_masks:
            draft_masks[b] = grammars.draft_bitmask(rid, layout.drafts[first:end - 1].tolist())
        state_masks, accepted = draft_masks[b]
        mask = state_masks[min(logit_row - first, accepted)].copy()
        if logit_row in held_back:
            clear_unless_all(mask, held_back[logit_row])
        rows.append(logit_row)
        masks.append(mask)
    step = grammars.bitmask(plain, held_back) if plain else None
    if step is not None:
        rows += step.rows.tolist()
        masks += list(step.bitmask)
    if not rows:
        return None
    return StepBitmask(np.array(rows, np.int64), np.stack(masks).astype(np.int32))

