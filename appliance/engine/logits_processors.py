"""Per-row logits processors: logit_bias, repetition / presence / frequency penalties, min_tokens.

Only the requests that set one are recorded here, and a step touches only the rows of those
requests: a batch without any pays one dict lookup per row. Each step's work is planned on the
host from the plan's arrays (`plan`, before the step in flight is committed), then applied to
the logits on the device with index tensors (`apply`; no host sync). Penalties keep per-request
token statistics on the device, in pooled rows (`PenaltyPool`), updated from the sampled tokens
where they lie (`count`). A step's index arrays travel to the device in one packed copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import kernels
from appliance.engine.plan_arrays import PlanArrays
from appliance.engine.protocol import MAX_REPETITION_PENALTY, GenerateRequest
from appliance.engine.transfer import to_device, to_device_packed
from appliance.engine.verify import LogitLayout

INT32_MAX = 2**31 - 1
MAX_BIAS = 100.0  # OpenAI's logit_bias range
MAX_PENALTY = 2.0  # OpenAI's presence/frequency range


def check_logits_processors(req: GenerateRequest, vocab_size: int) -> None:
    """ValueError naming the field unless the processors' fields are usable: within OpenAI's
    ranges (bias, presence/frequency) and a repetition penalty that keeps float32 logits finite
    (inf - inf would make a row NaN and the whole step fail)."""
    for token, bias in req.logit_bias.items():
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias: token id {token} is outside [0, {vocab_size})")
        if not -MAX_BIAS <= bias <= MAX_BIAS:  # NaN fails too
            raise ValueError(f"logit_bias: the bias of token {token} must be in "
                             f"[-{MAX_BIAS:g}, {MAX_BIAS:g}], got {bias}")
    if not 1 / MAX_REPETITION_PENALTY <= req.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise ValueError(f"repetition_penalty must be in [{1 / MAX_REPETITION_PENALTY:g}, "
                         f"{MAX_REPETITION_PENALTY:g}], got {req.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -MAX_PENALTY <= getattr(req, name) <= MAX_PENALTY:
            raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], "
                             f"got {getattr(req, name)}")
    if not 0 <= req.min_tokens <= INT32_MAX:
        raise ValueError(f"min_tokens must be in [0, {INT32_MAX}], got {req.min_tokens}")


@dataclass(frozen=True)
class _RowSpec:
    """One request's processors, as the host arrays each step concatenates."""

    prompt_len: int
    bias_ids: np.ndarray  # [N] int64
    bias_values: np.ndarray  # [N] float32
    penalties: tuple[float, float, float] | None  # repetition, presence, frequency
    min_tokens: int
    stop_ids: np.ndarray  # [S] int64: what min_tokens holds back


def _spec(req: GenerateRequest, stop_ids: list[int]) -> _RowSpec | None:
    penalties = (req.repetition_penalty, req.presence_penalty, req.frequency_penalty)
    has_penalties = penalties != (1.0, 0.0, 0.0)
    if not (req.logit_bias or has_penalties or req.min_tokens):
        return None
    return _RowSpec(len(req.prompt_ids), np.fromiter(req.logit_bias.keys(), np.int64),
                    np.fromiter(req.logit_bias.values(), np.float32),
                    penalties if has_penalties else None, req.min_tokens,
                    np.asarray(stop_ids, np.int64))


@dataclass(frozen=True)
class ProcessorStep:
    """One step's processor work, planned on the host. Row indices are batch rows."""

    bias_rows: np.ndarray  # [N] int64, with bias_ids / bias_values
    bias_ids: np.ndarray
    bias_values: np.ndarray
    penalty_rows: np.ndarray  # [P] int64, with their pool slots and the three penalties
    penalty_slots: np.ndarray
    penalties: np.ndarray  # [P, 3] float32: repetition, presence, frequency
    counted: np.ndarray  # [P] bool: the row samples a token, which its statistics then count
    # each penalized row's place in its chain (a verify step: counted where below the chain's
    # accepted count; a plain step: 0), NOT_COUNTED where it samples nothing; and its chain
    # (a verify step's plan row; None in a plain step)
    penalty_places: np.ndarray  # [P] int32
    penalty_chains: np.ndarray | None  # [P] int64
    # a verify step: the drafts before each penalized logits row in its chain, as (row, token,
    # times) triples, and each one's index into penalty_rows (the row's slot and penalties)
    draft_rows: np.ndarray  # [D] int64
    draft_ids: np.ndarray  # [D] int64
    draft_counts: np.ndarray  # [D] int32
    draft_penalty: np.ndarray  # [D] int64
    stop_rows: np.ndarray  # [M] int64, with stop_ids: masked while min_tokens is not reached
    stop_ids: np.ndarray
    held_back: dict[int, np.ndarray]  # row -> its stop ids, for the rows the caller masks itself


NOT_COUNTED = INT32_MAX  # a place no accepted count reaches


@dataclass(frozen=True)
class PenaltyCounting:
    """A step's penalized rows on the device (ProcessorStep's penalty_* fields), kept from
    `apply` for `count`: the tokens sampled at them join their requests' statistics."""

    slots: torch.Tensor
    rows: torch.Tensor
    places: torch.Tensor
    chains: torch.Tensor | None


class PenaltyPool:
    """Per-request token statistics on the device, one pooled row per penalized request:
    whether each token is in the prompt, and how often it was generated."""

    def __init__(self, device: torch.device, vocab_size: int) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.prompt_seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)   # [S, V]
        self.output_counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)  # [S, V]
        self._free: list[int] = []

    def acquire(self, prompt_ids: list[int]) -> int:
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.prompt_seen[slot] = False
        self.output_counts[slot] = 0
        ids = to_device(torch.tensor(prompt_ids, dtype=torch.int64), self.device)
        self.prompt_seen[slot, ids] = True
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def _grow(self) -> None:
        old = self.prompt_seen.shape[0]
        new = max(8, 2 * old)
        seen = torch.zeros(new, self.vocab_size, dtype=torch.bool, device=self.device)
        counts = torch.zeros(new, self.vocab_size, dtype=torch.int32, device=self.device)
        seen[:old] = self.prompt_seen
        counts[:old] = self.output_counts
        self.prompt_seen, self.output_counts = seen, counts
        self._free.extend(range(new - 1, old - 1, -1))


class LogitsProcessors:
    def __init__(self, device: torch.device, vocab_size: int) -> None:
        self.device = device
        self._specs: dict[int, _RowSpec] = {}
        self._slots: dict[int, int] = {}
        self._pool = PenaltyPool(device, vocab_size)
        self._penalize = kernels.select("apply_penalties", device=device.type, dtype=torch.float32)
        self._count = kernels.select("count_tokens", device=device.type, dtype=torch.float32)

    def add(self, req: GenerateRequest, stop_ids: list[int]) -> None:
        """Record `req`'s processors (nothing for a request that sets none). `stop_ids`: the ids
        that end it, which min_tokens holds back."""
        spec = _spec(req, stop_ids)
        if spec is None:
            return
        self._specs[req.rid] = spec
        if spec.penalties is not None:
            self._slots[req.rid] = self._pool.acquire(req.prompt_ids)

    def remove(self, rid: int) -> None:
        self._specs.pop(rid, None)
        slot = self._slots.pop(rid, None)
        if slot is not None:
            self._pool.release(slot)

    def plan(self, rids: np.ndarray, arrays: PlanArrays,
             masked_elsewhere: set[int] = frozenset(),
             layout: LogitLayout | None = None) -> ProcessorStep | None:
        """This step's work, or None when no row asks for any. The rows of `masked_elsewhere`
        rids get their min_tokens stop ids in `held_back` instead of a logits mask (a grammar
        mask folds them in, so that a grammar that can only end still can). `layout`: a
        verify step's, whose rows are its logits rows; a penalized row's statistics then count
        the drafts before it in its chain (`LogitLayout.drafts_before`) on top of the
        request's."""
        if not self._specs:
            return None
        rows = [(row, self._specs[rid]) for row, rid in enumerate(rids.tolist()) if rid in self._specs]
        if not rows:
            return None
        bias = [(row, s) for row, s in rows if len(s.bias_ids)]
        pen = [(row, s) for row, s in rows if s.penalties is not None]
        held: dict[int, np.ndarray] = {}
        stops = []
        for row, s in rows:
            generated = int(arrays.seq_lens[row]) - s.prompt_len  # before this step's token
            if generated < s.min_tokens and arrays.sample[row]:
                if int(rids[row]) in masked_elsewhere:
                    held[row] = s.stop_ids
                else:
                    stops.append((row, s))
        penalty_rows = np.array([row for row, _ in pen], np.int64)
        counted = np.array([bool(arrays.sample[row]) for row, _ in pen], bool)
        places = layout.local[penalty_rows] if layout is not None else np.zeros(len(pen), np.int64)
        drafts = layout.drafts_before() if layout is not None and len(pen) else None
        return ProcessorStep(
            bias_rows=_repeat_rows(bias, lambda s: len(s.bias_ids)),
            bias_ids=_cat([s.bias_ids for _, s in bias], np.int64),
            bias_values=_cat([s.bias_values for _, s in bias], np.float32),
            penalty_rows=penalty_rows,
            penalty_slots=np.array([self._slots[int(rids[row])] for row, _ in pen], np.int64),
            penalties=np.array([s.penalties for _, s in pen], np.float32).reshape(-1, 3),
            counted=counted,
            penalty_places=np.where(counted, places, NOT_COUNTED).astype(np.int32),
            penalty_chains=layout.row[penalty_rows] if layout is not None else None,
            **_drafts_of(penalty_rows, drafts, len(rids)),
            stop_rows=_repeat_rows(stops, lambda s: len(s.stop_ids)),
            stop_ids=_cat([s.stop_ids for _, s in stops], np.int64),
            held_back=held)

    def apply(self, logits: torch.Tensor, step: ProcessorStep) -> PenaltyCounting | None:
        """logits [B, V] f32, in place: bias, then penalties, then the min_tokens mask. Returns
        the penalized rows that sample a token, for `count` once it is sampled."""
        dev = self._upload_step(step)
        if "bias_rows" in dev:
            logits.index_put_((dev["bias_rows"], dev["bias_ids"]), dev["bias_values"],
                              accumulate=True)
        if "penalty_rows" in dev:
            rows, slots, penalties = dev["penalty_rows"], dev["penalty_slots"], dev["penalties"]
            drafted = self._drafted(logits, dev, slots, penalties) if "draft_rows" in dev else None
            self._penalize(logits, rows, slots, self._pool.prompt_seen, self._pool.output_counts,
                           penalties[:, 0], penalties[:, 1], penalties[:, 2])
            if drafted is not None:
                logits.index_put_(*drafted)
        if "stop_rows" in dev:
            rows = dev["stop_rows"]
            logits.index_put_((rows, dev["stop_ids"]),
                              torch.full_like(rows, float("-inf"), dtype=logits.dtype))
        if not step.counted.any():
            return None
        return PenaltyCounting(dev["penalty_slots"], dev["penalty_rows"], dev["penalty_places"],
                               dev.get("penalty_chains"))

    def _upload_step(self, step: ProcessorStep) -> dict[str, torch.Tensor]:
        """The step's non-empty index arrays on the device, by field name, in one copy."""
        names = [*(_BIAS if len(step.bias_rows) else ()),
                 *(_PENALTY if len(step.penalty_rows) else ()),
                 *(("penalty_chains",) if step.penalty_chains is not None
                   and len(step.penalty_rows) else ()),
                 *(_DRAFT if len(step.draft_rows) else ()),
                 *(_STOP if len(step.stop_rows) else ())]
        return dict(zip(names, self._upload(*(getattr(step, n) for n in names))))

    def _drafted(self, logits: torch.Tensor, dev: dict[str, torch.Tensor], slots: torch.Tensor,
                 penalties: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A verify step's drafted tokens, penalized as if generated: the (row, token) entries
        and their values, from the logits before the penalties (the whole rows are penalized
        with the request's statistics alone; these entries are then written over). The same
        op on a one-column pool of those entries, so the arithmetic is the op's own."""
        rows, ids, times, which = (dev[n] for n in _DRAFT)
        slot = slots[which]
        entries = logits[rows, ids].unsqueeze(1)                                  # [D, 1]
        seen = self._pool.prompt_seen[slot, ids].unsqueeze(1)
        counts = (self._pool.output_counts[slot, ids] + times).unsqueeze(1)
        each = torch.arange(len(rows), device=logits.device)
        self._penalize(entries, each, each, seen, counts, penalties[which, 0], penalties[which, 1],
                       penalties[which, 2])
        return (rows, ids), entries.squeeze(1)

    def count(self, tokens: torch.Tensor, counting: PenaltyCounting,
              accepted: torch.Tensor | None = None) -> None:
        """tokens [N] int32 on the device, sampled at the step's logits rows: each penalized row's
        token joins its request's statistics; of a verify step (`accepted` [B] int32 on the
        device: how many tokens each chain emits, `Verifier.accept`) only the emitted ones."""
        self._count(self._pool.output_counts, counting.slots, counting.rows, tokens,
                    counting.places, accepted, counting.chains if accepted is not None else None)

    def _upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        return to_device_packed([torch.from_numpy(np.ascontiguousarray(a)) for a in arrays], self.device)


_BIAS = ("bias_rows", "bias_ids", "bias_values")
_PENALTY = ("penalty_rows", "penalty_slots", "penalties", "penalty_places")
_DRAFT = ("draft_rows", "draft_ids", "draft_counts", "draft_penalty")
_STOP = ("stop_rows", "stop_ids")


def _drafts_of(penalty_rows: np.ndarray, drafts_before: tuple[np.ndarray, np.ndarray] | None,
               num_rows: int) -> dict[str, np.ndarray]:
    """ProcessorStep's draft_* fields: the drafts before each penalized row, a (row, token)
    pair once with the times it occurs."""
    empty = {"draft_rows": np.zeros(0, np.int64), "draft_ids": np.zeros(0, np.int64),
             "draft_counts": np.zeros(0, np.int32), "draft_penalty": np.zeros(0, np.int64)}
    if drafts_before is None or not len(penalty_rows):
        return empty
    index = np.full(num_rows, -1, np.int64)
    index[penalty_rows] = np.arange(len(penalty_rows))
    rows, ids = drafts_before
    keep = index[rows] >= 0
    if not keep.any():
        return empty
    pairs, times = np.unique(np.stack([rows[keep], ids[keep]], axis=1), axis=0, return_counts=True)
    return {"draft_rows": pairs[:, 0], "draft_ids": pairs[:, 1],
            "draft_counts": times.astype(np.int32), "draft_penalty": index[pairs[:, 0]]}


def _repeat_rows(rows: list[tuple[int, _RowSpec]], count) -> np.ndarray:
    return np.repeat(np.array([row for row, _ in rows], np.int64),
                     [count(s) for _, s in rows]).astype(np.int64)


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
