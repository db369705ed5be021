"""ForwardBatch: one step's tokens and KV layout, as torch tensors on the model's device.

The fields mirror the scheduler Plan of docs/INTERFACES.md §1/§3. B rows, T new tokens;
rows [0, num_decode) are decodes (exactly one token each), the rest extend rows: prefill
chunks, and speculative verify rows (a next token and its drafts) that need logits at every
token. Derived index tensors (`extend_query_start`, `last_token_index`, `logit_token_index`)
are computed once per batch on first use. A batch is passed down `forward` as an argument;
nothing global.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int
    positions: torch.Tensor  # [T] int: position of each token in its sequence
    query_start: torch.Tensor  # [B+1] int: row b owns tokens query_start[b]:query_start[b+1]
    prefix_lens: torch.Tensor  # [B] int: tokens of row b already cached before this step
    seq_lens: torch.Tensor  # [B] int: prefix_lens + new tokens
    page_table: torch.Tensor  # [B, P] int: page ids of row b (padding 0)
    slot_mapping: torch.Tensor  # [T] int: KV slot (page * page_size + offset) of each new token
    num_decode: int  # rows [0, num_decode) are single-token decodes
    # sum of the prefill rows' seq_lens, when the builder knows it on the host (None: read
    # from the device once, a sync); sizes the decompressed MLA keys of those rows
    extend_keys_host: int | None = None
    # [N] int: the tokens whose logits the step returns, in order (None: each row's last
    # token, N = B); verify rows list every token of the row
    logit_index: torch.Tensor | None = None
    # laid out in an extend graph's bucket (appliance/model/extend_graph.py): rows are read
    # from the device only, so no layer may choose its path from the host's view of them
    graph_bucket: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @cached_property
    def extend_query_start(self) -> torch.Tensor:
        """[B - num_decode + 1]: query_start of the prefill rows, rebased to their first token."""
        qs = self.query_start[self.num_decode:]
        return qs - qs[0]

    @cached_property
    def decode_seq_lens(self) -> torch.Tensor:
        """[num_decode]: seq_lens of the decode rows (one view for every layer of the step,
        so per-step kernel memos keyed on it hold: kernels/step_memo.py)."""
        return self.seq_lens[:self.num_decode]

    @cached_property
    def decode_page_table(self) -> torch.Tensor:
        """[num_decode, P]: the decode rows' page table (one view, as decode_seq_lens)."""
        return self.page_table[:self.num_decode]

    @cached_property
    def extend_seq_lens(self) -> torch.Tensor:
        """[B - num_decode]: seq_lens of the prefill rows (one view for every layer of the step,
        so per-step kernel memos keyed on it hold: kernels/step_memo.py)."""
        return self.seq_lens[self.num_decode:]

    @cached_property
    def extend_page_table(self) -> torch.Tensor:
        """[B - num_decode, P]: the prefill rows' page table (one view, as extend_seq_lens)."""
        return self.page_table[self.num_decode:]

    @cached_property
    def graph_decode_mask(self) -> torch.Tensor:
        """[B] bool: the rows an extend graph attends as decodes, found on the device (its
        layout is read from the device only): one token, which is token b of row b (the
        leading run of one-token rows, so q[:B] holds their queries in row order)."""
        qs = self.query_start
        rows = torch.arange(self.num_rows, dtype=qs.dtype, device=qs.device)
        return (qs[1:] - qs[:-1] == 1) & (qs[:-1] == rows)

    @cached_property
    def graph_decode_lens(self) -> torch.Tensor:
        """[B]: seq_lens of the rows in `graph_decode_mask`, 0 for the others (no keys)."""
        return torch.where(self.graph_decode_mask, self.seq_lens, 0)

    @cached_property
    def graph_extend_lens(self) -> torch.Tensor:
        """[B]: seq_lens with the rows of `graph_decode_mask` at 0 (the decode launch has them)."""
        return torch.where(self.graph_decode_mask, 0, self.seq_lens)

    @cached_property
    def extend_keys(self) -> int:
        """Keys of the prefill rows (cached prefix + new tokens), summed over those rows."""
        if self.extend_keys_host is not None:
            return self.extend_keys_host
        return int(self.extend_seq_lens.sum())

    @cached_property
    def last_token_index(self) -> torch.Tensor:
        """[B] int64: index into the T tokens of each row's last token."""
        return (self.query_start[1:] - 1).long()

    @cached_property
    def logit_token_index(self) -> torch.Tensor:
        """[N] int64: index into the T tokens of each token whose logits the model returns."""
        if self.logit_index is None:
            return self.last_token_index
        return self.logit_index.long()

    def at_logit_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, ...] at the tokens whose logits the step returns: x itself when that is every
        token in order (one token a row and no logit_index, as in a decode step: no index
        launches in its graph), else x[logit_token_index]."""
        if self.logit_index is None and self.num_tokens == self.num_rows:
            return x
        return x[self.logit_token_index]

    @property
    def num_logits(self) -> int:
        return self.num_rows if self.logit_index is None else int(self.logit_index.shape[0])

    def validate(self) -> None:
        """ValueError when the shapes disagree (cheap checks, no device sync)."""
        t, b = self.num_tokens, self.num_rows
        for name in ("positions", "slot_mapping"):
            if getattr(self, name).shape != (t,):
                raise ValueError(f"ForwardBatch.{name} has shape {tuple(getattr(self, name).shape)}"
                                 f", expected ({t},) like input_ids")
        if self.query_start.shape != (b + 1,):
            raise ValueError(f"ForwardBatch.query_start has shape {tuple(self.query_start.shape)},"
                             f" expected ({b + 1},)")
        if self.prefix_lens.shape != (b,) or self.page_table.dim() != 2 or \
                self.page_table.shape[0] != b:
            raise ValueError("ForwardBatch.prefix_lens / page_table disagree with seq_lens on B")
        if not 0 <= self.num_decode <= b:
            raise ValueError(f"ForwardBatch.num_decode {self.num_decode} not in [0, {b}]")
        if b == 0 or t == 0:
            raise ValueError("ForwardBatch is empty")
        if self.logit_index is not None and self.logit_index.dim() != 1:
            raise ValueError("ForwardBatch.logit_index must be 1-D")
