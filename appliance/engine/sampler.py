"""Per-request sampling parameters -> the `sample` kernel's per-row tensors."""

from __future__ import annotations

import math
import secrets

import numpy as np
import torch

import kernels
from appliance.engine.plan_arrays import PlanArrays
from appliance.engine.protocol import GenerateRequest
from appliance.engine.transfer import to_device_packed

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_sampling(req: GenerateRequest) -> None:
    """ValueError unless the request's parameters fit the `sample` kernel's rows (temperature,
    top_p float32; top_k int32; seed int64): a value outside them would raise inside a step
    and take the whole batch down with it."""
    if not (math.isfinite(req.temperature) and req.temperature >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0, got {req.temperature}")
    if not 0.0 < req.top_p <= 1.0:  # NaN fails too
        raise ValueError(f"top_p must be in (0, 1], got {req.top_p}")
    if not 0 <= req.top_k <= INT32_MAX:
        raise ValueError(f"top_k must be in [0, {INT32_MAX}], got {req.top_k}")
    if req.seed is not None and not INT64_MIN <= req.seed <= INT64_MAX:
        raise ValueError(f"seed must fit in a signed 64-bit integer, got {req.seed}")


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sample = kernels.select("sample", device=device.type, dtype=torch.float32)
        self._seeds: dict[int, int] = {}

    def warm_up(self, vocab_size: int) -> None:
        """One launch before the first request (a GPU backend compiles its kernels then): a
        greedy row and a temperature / top-k / top-p row."""
        logits = torch.zeros(2, vocab_size, dtype=torch.float32, device=self.device)  # [2, V]
        params = [torch.tensor([0.0, 0.7]), torch.tensor([0, 40], dtype=torch.int32),
                  torch.tensor([1.0, 0.9]), torch.tensor([0, 1]), torch.tensor([1, 1])]
        self._sample(logits, *to_device_packed(params, self.device))

    def add(self, req: GenerateRequest) -> None:
        # Without a seed, a random one: the row's randomness is still a pure function of
        # (seed, position), so a preempted and recomputed request samples the same tokens.
        self._seeds[req.rid] = req.seed if req.seed is not None else secrets.randbits(62)

    def remove(self, rid: int) -> None:
        self._seeds.pop(rid, None)

    def sample(self, logits: torch.Tensor, rids: np.ndarray, arrays: PlanArrays,
               params: dict[int, GenerateRequest]) -> torch.Tensor:
        """logits [B, V] float32 -> tokens [B] int32 (on the device; no host sync here)."""
        reqs = [params[int(rid)] for rid in rids]
        temperature = torch.tensor([r.temperature for r in reqs], dtype=torch.float32)
        top_k = torch.tensor([r.top_k for r in reqs], dtype=torch.int32)
        top_p = torch.tensor([r.top_p for r in reqs], dtype=torch.float32)
        seeds = torch.tensor([self._seeds[int(rid)] for rid in rids], dtype=torch.int64)
        # The position of the token being sampled: the row's KV length after this step.
        positions = torch.from_numpy(arrays.seq_lens.astype(np.int64))
        return self._sample(logits, *to_device_packed(
            [temperature, top_k, top_p, seeds, positions], self.device))
