"""Suffix-decoding drafts (SuffixDecoding, arXiv 2411.04975): continuations the conversation
itself has already shown, found in suffix trees (`_core.SuffixTree`, csrc/suffix_tree.h).

Where drafts come from:
- the request's own tree over its prompt and output: agents re-emit what they read (a file
  rewritten with a small change, a diff, repeated tool arguments);
- a global tree over the outputs of recent requests of every session, bounded in tokens (the
  oldest outputs leave first), for what agents write again and again.

A draft follows the most frequent continuation of the longest suffix of the context that
occurred before, and its length adapts to the evidence: at most `tokens_per_match` draft tokens
per matched token, and it stops where the estimated probability that the whole chain is accepted
falls below `min_prob`. Of the two trees' drafts the one with more expected accepted tokens wins.

Sessions: an agent's next turn resends the previous context plus a few new tokens, so a finished
request's tree is parked for its session and the next turn takes it over, indexing only the
tokens after the common prefix instead of rebuilding a 100K-token context (for a client that
sends no session, the park is keyed by the context's opening tokens, which its next turn
repeats). What the new prompt no longer holds (an answer it re-tokenized differently) stays in
the tree as extra text; the tree is rebuilt when that exceeds `max_stale_fraction` of it.
Parked trees are bounded in tokens, least recently parked dropped first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from appliance._core import Draft, SuffixTree


_OPENING_TOKENS = 64  # what identifies a conversation that comes without a session


@dataclass(frozen=True)
class SuffixParams:
    max_depth: int = 32  # tokens of each suffix indexed: the matched suffix plus the draft
    min_prob: float = 0.1
    tokens_per_match: float = 1.0
    global_tokens: int = 1 << 18  # outputs held by the global tree (~140 bytes a token)
    parked_tokens: int = 1 << 20  # tokens in the trees parked for sessions' next turns
    max_stale_fraction: float = 0.25


@dataclass
class _Request:
    tree: SuffixTree
    session: str
    prompt: np.ndarray  # int32
    output: list[int]
    tail: list[int]  # the context's last max_depth tokens: what a draft continues
    stale: int  # tokens in the tree that this context no longer holds


@dataclass
class _Parked:
    tree: SuffixTree
    context: np.ndarray  # int32: the finished request's prompt + output
    stale: int


class SuffixDraft:
    """`DraftSource` (appliance/engine/speculative/draft.py) by suffix decoding."""

    def __init__(self, params: SuffixParams = SuffixParams()) -> None:
        self.params = params
        self._requests: dict[int, _Request] = {}
        self._global = SuffixTree(params.max_depth, params.global_tokens)
        self._parked: OrderedDict[str, _Parked] = OrderedDict()
        self._parked_tokens = 0

    def start(self, rid: int, prompt: Sequence[int], session: str) -> None:
        prompt = np.asarray(prompt, dtype=np.int32)
        tree, stale = self._take_parked(session, prompt)
        tail = prompt[-self.params.max_depth:].tolist()
        self._requests[rid] = _Request(tree, session, prompt, [], tail, stale)

    def extend(self, rid: int, tokens: Sequence[int]) -> None:
        req = self._requests[rid]
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        req.tree.extend(tokens)
        req.output += tokens
        req.tail = (req.tail + tokens)[-self.params.max_depth:]

    def propose(self, rid: int, max_draft: int) -> list[int]:
        draft = self.draft(rid, max_draft)
        return draft.tokens if draft is not None else []

    def draft(self, rid: int, max_draft: int) -> Draft | None:
        """The chosen draft with its match statistics (None for an unknown request)."""
        req = self._requests.get(rid)
        if req is None or max_draft <= 0:
            return None
        p = self.params
        best = req.tree.propose(req.tail, max_draft, p.min_prob, p.tokens_per_match)
        if self._global.num_tokens:
            other = self._global.propose(req.tail, max_draft, p.min_prob, p.tokens_per_match)
            if other.score > best.score:
                best = other
        return best

    def finish(self, rid: int) -> None:
        req = self._requests.pop(rid, None)
        if req is None:
            return
        if req.output:
            self._global.add(req.output)
        context = np.concatenate([req.prompt, np.asarray(req.output, dtype=np.int32)])
        self._park(_park_key(req.session, context), _Parked(req.tree, context, req.stale))

    # -- sessions ------------------------------------------------------------------------------

    def _take_parked(self, session: str, prompt: np.ndarray) -> tuple[SuffixTree, int]:
        parked = self._parked.pop(_park_key(session, prompt), None)
        if parked is not None:
            self._parked_tokens -= parked.tree.num_tokens
            kept = _common_prefix(parked.context, prompt)
            stale = parked.stale + len(parked.context) - kept
            grown = parked.tree.num_tokens + len(prompt) - kept
            if stale <= self.params.max_stale_fraction * grown:
                parked.tree.extend(prompt[kept:])
                return parked.tree, stale
        tree = SuffixTree(self.params.max_depth)
        tree.add(prompt)
        return tree, 0

    def _park(self, key: str, parked: _Parked) -> None:
        older = self._parked.pop(key, None)  # a concurrent turn of the session parked first
        if older is not None:
            self._parked_tokens -= older.tree.num_tokens
        self._parked[key] = parked
        self._parked_tokens += parked.tree.num_tokens
        while self._parked_tokens > self.params.parked_tokens:
            _, dropped = self._parked.popitem(last=False)
            self._parked_tokens -= dropped.tree.num_tokens

    def indexed_tokens(self, rid: int) -> int:
        """Tokens in the request's tree (its context, plus what an earlier turn left)."""
        return self._requests[rid].tree.num_tokens

    @property
    def global_tree(self) -> SuffixTree:
        return self._global

    @property
    def parked_tokens(self) -> int:
        return self._parked_tokens


def _park_key(session: str, context: np.ndarray) -> str:
    """Where a finished turn's tree waits for the next turn: under its session, else under the
    opening tokens its next prompt will repeat."""
    if session:
        return "session:" + session
    opening = np.ascontiguousarray(context[:_OPENING_TOKENS], dtype=np.int32).tobytes()
    return "opening:" + hashlib.blake2b(opening, digest_size=16).hexdigest()


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
