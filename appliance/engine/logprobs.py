"""Log-probabilities for the requests that ask (`GenerateRequest.logprobs`).

They are taken from the model's raw distribution: log-softmax of its logits before temperature,
penalties, bias or a grammar mask (vLLM's default, `raw_logprobs`): what the model thought of
each token, whatever the sampler then did with it. Computed on the device next to the sampler,
copied to the host with the sampled tokens, read when the step is committed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from appliance.engine.protocol import GenerateRequest, TokenLogprobs

MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)


def check_logprobs(req: GenerateRequest) -> None:
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {req.logprobs}")


@dataclass(frozen=True)
class LogprobRows:
    """The batch rows that asked, and how many alternatives each wants."""

    rows: np.ndarray  # [R] int64
    ks: list[int]

    @property
    def k(self) -> int:
        return max(self.ks)


def logprob_rows(reqs: list[GenerateRequest | None],
                 row_request: np.ndarray | None = None) -> LogprobRows | None:
    """The rows whose request asked: `reqs` per row, or per request with `row_request` [B]
    each row's index into it."""
    if all(r is None or r.logprobs is None for r in reqs):
        return None
    k_of = np.array([-1 if r is None or r.logprobs is None else r.logprobs for r in reqs], np.int64)
    ks = k_of if row_request is None else k_of[row_request]
    rows = np.flatnonzero(ks >= 0).astype(np.int64)
    return LogprobRows(rows, ks[rows].tolist())


@dataclass(frozen=True)
class Logprobs:
    """One step's log-probabilities for the rows that asked (device, then host)."""

    rows: LogprobRows
    sampled: torch.Tensor  # [R] float32: the sampled token's
    top_ids: torch.Tensor  # [R, k] int64, most probable first
    top_values: torch.Tensor  # [R, k] float32

    @staticmethod
    def compute(raw: torch.Tensor, rows: LogprobRows, rows_device: torch.Tensor,
                tokens: torch.Tensor) -> Logprobs:
        """raw: [R, V] log-softmax of the asking rows' raw logits; tokens [B] int32 (all rows)."""
        sampled = raw.gather(1, tokens[rows_device].long().unsqueeze(1)).squeeze(1)    # [R]
        top = raw.topk(rows.k, dim=1)                                                     # [R, k]
        return Logprobs(rows, sampled, top.indices, top.values)

    def to_host(self) -> Logprobs:
        return Logprobs(self.rows, *(t.to("cpu", non_blocking=True)
                                     for t in (self.sampled, self.top_ids, self.top_values)))

    def by_row(self) -> dict[int, TokenLogprobs]:
        """Host values per batch row (call once the copy is done)."""
        sampled, ids, values = self.sampled.tolist(), self.top_ids.tolist(), self.top_values.tolist()
        return {int(row): TokenLogprobs(sampled[i], ids[i][:k], values[i][:k])
                for i, (row, k) in enumerate(zip(self.rows.rows, self.rows.ks))}
