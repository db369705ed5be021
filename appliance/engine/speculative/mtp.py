"""MTP drafts: the checkpoint's own multi-token-prediction layer proposes the chain.

An MTP layer (appliance/model/mtp.py) turns the target's hidden state h_t and the token at t+1
into logits for the token at t+2. It has a KV cache of its own, which must hold every position
the target committed, so `NextTokenPass` runs after every target step (prefill chunks
included) over that step's tokens, at the target's positions and slots, each token paired with
the one that follows it: the next token of the prompt, or the token the target sampled there
(a verify row's accepted drafts are the tokens the target sampled at their positions). Its
logits at each row's last accepted position give the first draft; a chain of k reuses the
layer k - 1 more times, one position further each time, on its own normed state and its last
draft (as vLLM and SGLang do). Those chained positions are written in the MTP cache of pages
the row already holds (the rest of its current page, or pages its verify row leased), so no
page is needed beyond what the scheduler gave; a chain stops at the first position outside
them. Whatever those writes leave behind (and a rejected draft's position) is overwritten when
the target commits that position, before anything reads it.

`MTPDraft` is the `DraftSource` rank 0's Speculator calls: it holds each request's context
(for the prompt tokens a prefill chunk's last token is followed by) and the latest chain the
pass made for it, which `propose` hands out while it still continues the committed context.

With tensor parallelism every rank runs the same pass: rank 0 broadcasts the pass's inputs
(the following tokens and each row's last accepted position over the device group, the chain
length over the plan's CPU group, so no rank waits for its GPU to read it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from appliance.engine.plan_arrays import PlanArrays
from appliance.engine.transfer import to_device_packed
from appliance.engine.verify import LogitLayout


@dataclass(frozen=True)
class Following:
    """Host arrays of one step saying which token follows each of its T tokens."""

    take: np.ndarray  # [T] int32: the logits row whose sampled token follows it (-1: none)
    known: np.ndarray  # [T] int32: the next token when the context holds it (-1: unknown)


class MTPDraft:
    """`DraftSource` (appliance/engine/speculative/draft.py) from the chains `NextTokenPass`
    makes; the engine hands them over with `offer` after each commit."""

    def __init__(self, max_draft: int = 1) -> None:
        self._context: dict[int, list[int]] = {}
        self._chains: dict[int, tuple[int, list[int]]] = {}  # rid -> (context length, chain)
        self.depth = max(1, max_draft)  # drafts the next pass makes (what was last asked for)
        self._asked = 0

    def start(self, rid: int, prompt: Sequence[int], session: str) -> None:
        self._context[rid] = [int(t) for t in prompt]

    def extend(self, rid: int, tokens: Sequence[int]) -> None:
        self._context[rid].extend(int(t) for t in tokens)

    def propose(self, rid: int, max_draft: int) -> list[int]:
        self._asked = max(self._asked, max_draft)
        chain = self._chains.get(rid)
        context = self._context.get(rid)
        if chain is None or context is None or chain[0] != len(context):
            return []
        return chain[1][:max_draft]

    def finish(self, rid: int) -> None:
        self._context.pop(rid, None)
        self._chains.pop(rid, None)

    def offer(self, rids: np.ndarray, chains: np.ndarray) -> None:
        """A pass's chains: rids [B] (each row's request), chains [B, 2 + k] int32 (the
        context length the chain continues, how many drafts are valid, the drafts)."""
        for rid, row in zip(rids.tolist(), chains):
            if rid in self._context and row[1] > 0:
                self._chains[rid] = (int(row[0]), row[2:2 + row[1]].tolist())
        # the next passes chain as far as proposals asked since the last offer: 1 while
        # nobody drafts (the first draft only keeps the decision to draft current)
        self.depth, self._asked = max(1, self._asked), 0

    def following(self, rids: np.ndarray, arrays: PlanArrays, layout: LogitLayout | None
                  ) -> Following:
        """Which token follows each token of a planned step (rids [B]: each row's request):
        a sampled one at every position the target samples, else the context's next."""
        t = len(arrays.input_ids)
        take, known = np.full(t, -1, np.int32), np.full(t, -1, np.int32)
        last = arrays.query_start[1:] - 1                                     # [B]
        if layout is None:
            rows = np.flatnonzero(arrays.sample)
            take[last[rows]] = rows
        else:
            sampling = arrays.sample[layout.row] != 0                         # [N]
            take[layout.index[sampling]] = np.flatnonzero(sampling)
        for b in np.flatnonzero(arrays.sample == 0):   # a prefill chunk before the prompt's end
            context = self._context.get(int(rids[b]))
            at = int(arrays.positions[last[b]]) + 1
            if context is not None and at < len(context):
                known[last[b]] = context[at]
        return Following(take, known)


class NextTokenPass:
    """The MTP layer after each target step, on every rank (module doc)."""

    def __init__(self, runner, group: dist.ProcessGroup | None = None) -> None:
        """`group`: the plan channel's CPU group (None: one rank)."""
        if runner.num_mtp_layers == 0:
            raise ValueError("speculative.method: mtp needs a checkpoint with next-token (MTP) "
                             "layers; this model has none")
        self.runner, self.group = runner, group

    def launch(self, batch, hidden: torch.Tensor, arrays: PlanArrays, following: Following,
               sampled: torch.Tensor, last_logit: torch.Tensor | None, depth: int
               ) -> torch.Tensor:
        """Rank 0, after the target's sampler: sampled [N] (each logits row's token),
        last_logit [B] (each row's last accepted logits row; None: each row's one) -> chains
        [B, 2 + depth] int32 on the device (MTPDraft.offer)."""
        take, known = to_device_packed([torch.from_numpy(following.take),
                                        torch.from_numpy(following.known)], hidden.device)
        shifted = torch.cat([batch.input_ids[1:], batch.input_ids[:1]])                 # [T]
        ids = torch.where(take >= 0, sampled[take.clamp(min=0).long()].to(shifted.dtype),
                          torch.where(known >= 0, known.to(shifted.dtype), shifted))
        last = (batch.last_token_index if last_logit is None
                else batch.logit_token_index[last_logit.long()])                          # [B]
        inputs = torch.cat([ids.long(), last.long()])
        if self.group is not None:
            dist.broadcast(torch.tensor([depth]), 0, group=self.group)
            dist.broadcast(inputs, 0)
        return self._run(batch, hidden, arrays, inputs, depth)

    def follow(self, batch, hidden: torch.Tensor, arrays: PlanArrays) -> None:
        """Ranks > 0: the same pass, on the inputs rank 0 broadcasts."""
        depth = torch.empty(1, dtype=torch.int64)
        dist.broadcast(depth, 0, group=self.group)
        inputs = torch.empty(batch.num_tokens + batch.num_rows, dtype=torch.int64,
                             device=hidden.device)
        dist.broadcast(inputs, 0)
        self._run(batch, hidden, arrays, inputs, int(depth))

    @torch.inference_mode()
    def _run(self, batch, hidden: torch.Tensor, arrays: PlanArrays, inputs: torch.Tensor,
             depth: int) -> torch.Tensor:
        from appliance.model import ForwardBatch

        t, b = batch.num_tokens, batch.num_rows
        ids, last = inputs[:t], inputs[t:]
        logits, z = self.runner.forward_next_token(0, ids, hidden, batch, last)
        drafts = [logits.argmax(dim=-1)]                                               # [B]
        dev, ps = hidden.device, self.runner.page_size
        valid, owned = to_device_packed(
            [torch.from_numpy(arrays.sample != 0),
             torch.from_numpy((arrays.seq_lens.astype(np.int64) + ps - 1) // ps)], dev)  # [B]
        length = valid.long()
        position = batch.positions[last].long()                                         # [B]
        pages = batch.page_table.long()                                                 # [B, P]
        rows = torch.arange(b, device=dev)
        for j in range(1, depth):
            at = position + j
            valid = valid & (at // ps < owned)
            page = pages[rows, (at // ps).clamp(max=pages.shape[1] - 1)]
            slot = torch.where(valid, page * ps + at % ps, -1)
            seq = torch.minimum(at + 1, owned * ps)
            i32 = torch.int32
            step = ForwardBatch(
                input_ids=drafts[-1].to(i32), positions=at.to(i32),
                query_start=torch.arange(b + 1, device=dev, dtype=i32),
                prefix_lens=(seq - 1).to(i32), seq_lens=seq.to(i32),
                page_table=batch.page_table, slot_mapping=slot.to(i32), num_decode=b)
            logits, z = self.runner.forward_next_token(0, step.input_ids, z, step, rows)
            drafts.append(logits.argmax(dim=-1))
            length += valid.long()
        context = position + 2  # the chain continues the tokens up to the sampled one
        return torch.cat([context[:, None], length[:, None], torch.stack(drafts, 1)],
                         dim=1).to(torch.int32)
