"""TokenSpeed control plane (C++): KV page pool, prefix cache, request FSM, scheduler.

See docs/INTERFACES.md §1. Arrays are numpy int32 unless noted.
"""
from typing import Optional

import numpy as np
import numpy.typing as npt

class SchedulerConfig:
    """Everything the C++ Scheduler is built from. The settings have no defaults here: the
    engine fills them from appliance/config.py (YAML `kv:`, `scheduler:`) and the model runner.
    min_prefill_chunk is internal to the C++ policy and keeps its C++ default."""

    num_pages: int
    page_size: int
    max_batch_tokens: int
    max_running: int
    tps_floor: float  # 0 = off
    session_ttl_s: float  # 0 = no retention
    max_seq_len: int
    min_prefill_chunk: int
    def __init__(
        self,
        *,
        num_pages: int,
        page_size: int,
        max_batch_tokens: int,
        max_running: int,
        tps_floor: float,
        session_ttl_s: float,
        max_seq_len: int,
        min_prefill_chunk: int = ...,
    ) -> None: ...  # ValueError names the bad field

class Plan:
    step: int
    num_decode: int  # rows [0, num_decode) are plain decodes; verify rows (num_draft > 0) follow
    predicted_time_s: float
    rids: npt.NDArray[np.int64]  # [B]
    input_ids: npt.NDArray[np.int32]  # [T]; -(r+1) = token sampled by row r of the previous plan
    positions: npt.NDArray[np.int32]  # [T]
    query_start: npt.NDArray[np.int32]  # [B+1]
    prefix_lens: npt.NDArray[np.int32]  # [B]
    seq_lens: npt.NDArray[np.int32]  # [B]
    page_table: npt.NDArray[np.int32]  # [B, P], 0-padded
    slot_mapping: npt.NDArray[np.int32]  # [T]
    sample: npt.NDArray[np.int32]  # [B]
    num_draft: npt.NDArray[np.int32]  # [B]: draft tokens after the row's first token
    total_drafts: int  # sum of num_draft: commit takes num_rows + total_drafts tokens
    @property
    def num_rows(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...

class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None: ...
    @property
    def config(self) -> SchedulerConfig: ...
    def submit(
        self,
        rid: int,
        prompt: npt.ArrayLike,
        max_new_tokens: int,
        stop_ids: npt.ArrayLike = ...,
        session: str = "",
    ) -> None: ...
    def set_drafts(self, rid: int, drafts: npt.ArrayLike) -> int: ...  # drafts kept (0: refused)
    def plan(self) -> Optional[Plan]: ...
    def commit(
        self,
        step: int,
        tokens: npt.ArrayLike,  # [num_rows + total_drafts]: row b's 1 + num_draft[b] in order
        step_time_s: float = 0.0,
        counts: Optional[npt.ArrayLike] = None,  # [num_rows]: tokens row b emits (None: 1 each)
    ) -> list[tuple[int, int, str]]: ...  # one event per emitted token
    def abort(self, rid: int) -> bool: ...
    def expire_sessions(self) -> None: ...  # drop session pins past their TTL (plan() does too)
    def stats(self) -> dict[str, int]: ...
    def cached_tokens(self, rid: int) -> Optional[int]: ...  # prefix-cache hit at first admission; None if unknown/queued
    # every live request, by rid: (rid, state, context_tokens, cached_tokens, kv_tokens);
    # state "queued" | "prefilling" | "decoding" | "preempted"
    def progress(self) -> list[tuple[int, str, int, int, int]]: ...
    # debug / test hooks
    def check_invariants(self) -> None: ...  # raises RuntimeError
    def evict_cache(self) -> int: ...
    def set_test_clock(self, now_s: float) -> None: ...
    def clear_test_clock(self) -> None: ...
    def cost_coeffs(self) -> tuple[float, float, float, float, float, float, float]: ...  # a..g (cost_model.h)
    def set_cost_prior(self, a: float, b: float, c: float, d: float, e: float,
                       f: float | None = None, g: float | None = None) -> None: ...
    def state(self, rid: int) -> str: ...  # "" | queued | prefilling | decoding | verifying | preempted
    def inflight_steps(self) -> int: ...

class Draft:
    """A suffix-tree draft: the most frequent continuation of the longest matched suffix."""

    tokens: list[int]
    probs: list[float]  # probs[i]: estimated probability that tokens[:i+1] are all accepted
    match_len: int  # tokens of the context's suffix that matched
    score: float  # sum of probs: the expected number of accepted tokens

class SuffixTree:
    """Depth-bounded suffix tree over token sequences (csrc/suffix_tree.h). Only the last
    sequence is open to extend(); with max_tokens > 0, the oldest closed sequences are dropped
    beyond that many tokens."""

    def __init__(self, max_depth: int, max_tokens: int = 0) -> None: ...  # ValueError if bad
    def add(self, tokens: npt.ArrayLike) -> None: ...  # a new sequence; closes the open one
    def extend(self, tokens: npt.ArrayLike) -> None: ...  # RuntimeError if none is open
    def propose(
        self, context: npt.ArrayLike, max_draft: int, min_prob: float, tokens_per_match: float
    ) -> Draft: ...
    @property
    def max_depth(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_sequences(self) -> int: ...
    @property
    def open_length(self) -> int: ...
    @property
    def num_nodes(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    def check_invariants(self) -> None: ...  # raises RuntimeError
