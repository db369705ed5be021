"""One step's batch as plain int32 arrays: what rank 0 got from the scheduler and what every rank
runs. The same type on every rank, so SPMD ranks build identical forward batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# Order of the 1-D per-token / per-row arrays in the broadcast buffer.
_FLAT_FIELDS = ("input_ids", "positions", "query_start", "prefix_lens", "seq_lens", "slot_mapping",
                "sample", "num_draft")
_STOP = -1


@dataclass(frozen=True)
class PlanArrays:
    step: int
    num_decode: int
    input_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    query_start: np.ndarray  # [B+1] int32
    prefix_lens: np.ndarray  # [B] int32
    seq_lens: np.ndarray  # [B] int32
    slot_mapping: np.ndarray  # [T] int32
    sample: np.ndarray  # [B] int32
    num_draft: np.ndarray  # [B] int32: draft tokens of a verify row (after its first token)
    page_table: np.ndarray  # [B, P] int32

    @classmethod
    def from_plan(cls, plan) -> PlanArrays:
        """Copy out of the scheduler's Plan (its buffers are reused by the next plan())."""
        fields = {name: np.array(getattr(plan, name), dtype=np.int32) for name in _FLAT_FIELDS}
        return cls(step=int(plan.step), num_decode=int(plan.num_decode),
                   page_table=np.array(plan.page_table, dtype=np.int32), **fields)

    @property
    def num_rows(self) -> int:
        return len(self.seq_lens)

    @property
    def has_drafts(self) -> bool:
        return bool(self.num_draft.any())


class PlanChannel:
    """Rank 0 broadcasts each plan to the other ranks over a CPU (gloo) group."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def send(self, arrays: PlanArrays) -> None:
        if self.group is None:
            return
        t, b = len(arrays.input_ids), arrays.num_rows
        p = arrays.page_table.shape[1]
        header = torch.tensor([arrays.step, arrays.num_decode, t, b, p], dtype=torch.int64)
        dist.broadcast(header, 0, group=self.group)
        parts = [getattr(arrays, name).ravel() for name in _FLAT_FIELDS] + [arrays.page_table.ravel()]
        dist.broadcast(torch.from_numpy(np.concatenate(parts)), 0, group=self.group)

    def send_stop(self) -> None:
        if self.group is not None:
            dist.broadcast(torch.tensor([_STOP, 0, 0, 0, 0], dtype=torch.int64), 0, group=self.group)

    def receive(self) -> PlanArrays | None:
        """On ranks > 0: the next plan, or None when rank 0 stops."""
        header = torch.empty(5, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.group)
        step, num_decode, t, b, p = header.tolist()
        if step == _STOP:
            return None
        sizes = {"input_ids": t, "positions": t, "query_start": b + 1, "prefix_lens": b,
                 "seq_lens": b, "slot_mapping": t, "sample": b, "num_draft": b}
        flat = torch.empty(sum(sizes.values()) + b * p, dtype=torch.int32)
        dist.broadcast(flat, 0, group=self.group)
        values, offset = {}, 0
        for name in _FLAT_FIELDS:
            values[name] = flat[offset:offset + sizes[name]].numpy()
            offset += sizes[name]
        page_table = flat[offset:].numpy().reshape(b, p)
        return PlanArrays(step=step, num_decode=num_decode, page_table=page_table, **values)
