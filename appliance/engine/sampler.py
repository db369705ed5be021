"""Per-request sampling parameters -> the `sample` kernel's per-row tensors, with the rows that
ask for them edited first (logits processors, a grammar's token bitmask) and their
log-probabilities taken.

Two phases, so that a grammar's mask can wait for the step in flight (engine.py `step`):
`prepare` snapshots each row's parameters from the plan while every row's request is known;
`sample` applies them to the logits, with the bitmask computed in between.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Container
from dataclasses import dataclass

import numpy as np
import torch

import kernels
from appliance.engine.constraints import StepBitmask
from appliance.engine.logits_processors import LogitsProcessors, PenaltyCounting, ProcessorStep
from appliance.engine.logprobs import LogprobRows, Logprobs, logprob_rows
from appliance.engine.plan_arrays import PlanArrays
from appliance.engine.protocol import MIN_TOP_P, GenerateRequest
from appliance.engine.transfer import to_device, to_device_packed
from appliance.engine.verify import LogitLayout

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Below this temperature a row is sampled greedily (as vLLM does): logits / a subnormal
# temperature overflow float32 and would make the row NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5
# A row whose request ended while its step was planned: sampled greedily, the token discarded.
_DISCARDED = GenerateRequest(rid=-1, prompt_ids=[], max_new_tokens=1, temperature=0.0)


def check_sampling(req: GenerateRequest) -> None:
    """ValueError unless the request's parameters fit the `sample` kernel's rows (temperature,
    top_p float32; top_k int32; seed int64): a value outside them would raise inside a step
    and take the whole batch down with it."""
    if not 0.0 <= req.temperature <= FLOAT32_MAX:  # NaN fails too; float32 inf gives NaN rows
        raise ValueError(f"temperature must be in [0, {FLOAT32_MAX:g}], got {req.temperature}")
    if not MIN_TOP_P <= req.top_p <= 1.0:  # NaN fails too
        raise ValueError(f"top_p must be in (0, 1], got {req.top_p}")
    if not 0 <= req.top_k <= INT32_MAX:
        raise ValueError(f"top_k must be in [0, {INT32_MAX}], got {req.top_k}")
    if req.seed is not None and not INT64_MIN <= req.seed <= INT64_MAX:
        raise ValueError(f"seed must fit in a signed 64-bit integer, got {req.seed}")


@dataclass(frozen=True)
class SampleRows:
    """One step's rows, snapshotted from the plan (host)."""

    rids: np.ndarray  # [B] int64
    params: list[torch.Tensor]  # the `sample` kernel's temperature, top_k, top_p, seeds, positions
    processors: ProcessorStep | None
    logprobs: LogprobRows | None
    constrained: list[tuple[int, int]]  # (row, rid) of the sampling rows under a grammar
    verify: bool = False  # a verify step's logits rows: statistics count what it emits (count_emitted)


@dataclass(frozen=True)
class Sampled:
    tokens: torch.Tensor  # [B] int32, on the device
    logprobs: Logprobs | None
    uncounted: PenaltyCounting | None = None  # a verify step's penalized rows: count_emitted


class Sampler:
    def __init__(self, device: torch.device, vocab_size: int) -> None:
        self.device = device
        self._sample = kernels.select("sample", device=device.type, dtype=torch.float32)
        self._mask = kernels.select("apply_token_bitmask", device=device.type, dtype=torch.float32)
        self._seeds: dict[int, int] = {}
        self.processors = LogitsProcessors(device, vocab_size)

    def warm_up(self, vocab_size: int) -> None:
        """One launch before the first request (a GPU backend compiles its kernels then): a
        greedy row and a temperature / top-k / top-p row."""
        self.warm_up_launch(vocab_size)()

    def warm_up_launch(self, vocab_size: int) -> Callable[[], object]:
        """warm_up's launch, to run later or elsewhere (the runner compiles it ahead)."""
        def launch() -> object:
            logits = torch.zeros(2, vocab_size, dtype=torch.float32, device=self.device)  # [2, V]
            params = [torch.tensor([0.0, 0.7]), torch.tensor([0, 40], dtype=torch.int32),
                      torch.tensor([1.0, 0.9]), torch.tensor([0, 1]), torch.tensor([1, 1])]
            return self._sample(logits, *to_device_packed(params, self.device))
        return launch

    def add(self, req: GenerateRequest, stop_ids: list[int]) -> None:
        # Without a seed, a random one: the row's randomness is still a pure function of
        # (seed, position), so a preempted and recomputed request samples the same tokens.
        self._seeds[req.rid] = req.seed if req.seed is not None else secrets.randbits(62)
        self.processors.add(req, stop_ids)

    def remove(self, rid: int) -> None:
        self._seeds.pop(rid, None)
        self.processors.remove(rid)

    def prepare(self, rids: np.ndarray, arrays: PlanArrays, params: dict[int, GenerateRequest],
                constrained: Container[int] = frozenset(),
                layout: LogitLayout | None = None) -> SampleRows:
        """The rows' parameters while every row's request is known (before the step in
        flight is committed). `constrained`: the rids under a grammar. `layout` (a verify
        step, whose rows are its logits rows, 1 + k a request; `arrays` then as
        `layout.per_logit_row` gives them): `rids` holds each request once."""
        row_request = layout.row if layout is not None else None
        reqs = [params.get(rid) for rid in rids.tolist()]
        known = [r or _DISCARDED for r in reqs]
        per_request = [
            torch.tensor([r.temperature * (r.temperature >= GREEDY_BELOW_TEMPERATURE)
                          for r in known], dtype=torch.float32),
            torch.tensor([r.top_k for r in known], dtype=torch.int32),
            torch.tensor([r.top_p for r in known], dtype=torch.float32),
            torch.tensor([self._seeds.get(rid, 0) for rid in rids.tolist()], dtype=torch.int64)]
        if row_request is not None:
            index = torch.from_numpy(row_request)
            per_request = [t[index] for t in per_request]
            rids = rids[row_request]
        # The position of the token being sampled: the row's KV length after this step.
        positions = torch.from_numpy(arrays.seq_lens.astype(np.int64))
        under_grammar = [(row, int(rid)) for row, rid in enumerate(rids)
                         if arrays.sample[row] and int(rid) in constrained] if constrained else []
        masked = {rid for _, rid in under_grammar}
        return SampleRows(rids, [*per_request, positions],
                          self.processors.plan(rids, arrays, masked, layout),
                          logprob_rows(reqs, row_request), under_grammar, verify=layout is not None)

    @torch.inference_mode()  # the runner's logits are inference tensors: edited in place here
    def sample(self, logits: torch.Tensor, rows: SampleRows,
               bitmask: StepBitmask | None = None) -> Sampled:
        """logits [B, V] float32 (edited in place) -> tokens [B] int32 on the device, and the
        log-probabilities of the rows that asked; no host sync here."""
        raw = None
        if rows.logprobs is not None:
            lp_rows = to_device(torch.from_numpy(rows.logprobs.rows), self.device)
            raw = torch.log_softmax(logits[lp_rows], dim=-1)                          # [R, V]
        counting = None
        if rows.processors is not None:
            counting = self.processors.apply(logits, rows.processors)
        if bitmask is not None:
            mask_rows, mask = to_device_packed([torch.from_numpy(bitmask.rows),
                                                torch.from_numpy(bitmask.bitmask)], self.device)
            self._mask(logits, mask, mask_rows)
        tokens = self._sample(logits, *to_device_packed(rows.params, self.device))  # [B] int32
        if counting is not None and not rows.verify:
            self.processors.count(tokens, counting)
            counting = None
        logprobs = None if raw is None else Logprobs.compute(raw, rows.logprobs, lp_rows, tokens)
        return Sampled(tokens, logprobs, counting)

    def count_emitted(self, sampled: Sampled, counts: torch.Tensor) -> None:
        """After a verify step's `Verifier.accept` (counts [B] on the device): the penalized
        requests' statistics count the tokens it emits, not the rejected drafts' rows."""
        if sampled.uncounted is not None:
            self.processors.count(sampled.tokens, sampled.uncounted, counts)
