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

Indexing a long prompt (a new 100K-token conversation: ~0.1 s) runs on a worker thread (the
tree releases the GIL), off the engine loop: the request drafts nothing until its tree is ready,
which is normally long before its prefill ends; accepted tokens wait in the meantime.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from appliance._core import Draft, SuffixTree


_OPENING_TOKENS = 64  # what identifies a conversation that comes without a session
_BACKGROUND_TOKENS = 8192  # indexing at least this many tokens runs on the worker thread


@dataclass(frozen=True)
class SuffixParams:
    max_depth: int = 32  # tokens of each suffix indexed: the matched suffix plus the draft
    min_prob: float = 0.1
    tokens_per_match: float = 2.0  # edit workload, k=8: 1.0 -> 5.8, 2.0 -> 6.0 tokens a step
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
    indexing: Future | None = None  # the prompt is being indexed on the worker thread
    waiting: list[int] = field(default_factory=list)  # accepted meanwhile, for the tree


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
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="suffix-index")

    def start(self, rid: int, prompt: Sequence[int], session: str) -> None:
        prompt = np.asarray(prompt, dtype=np.int32)
        tree, stale, index, new = self._tree_for(session, prompt)
        tail = prompt[-self.params.max_depth:].tolist()
        req = _Request(tree, session, prompt, [], tail, stale)
        if new >= _BACKGROUND_TOKENS:
            req.indexing = self._worker.submit(index)
        else:
            index()
        self._requests[rid] = req

    def extend(self, rid: int, tokens: Sequence[int]) -> None:
        req = self._requests[rid]
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        if _ready(req):
            req.tree.extend(tokens)
        else:
            req.waiting += tokens
        req.output += tokens
        req.tail = (req.tail + tokens)[-self.params.max_depth:]

    def propose(self, rid: int, max_draft: int) -> list[int]:
        draft = self.draft(rid, max_draft)
        return draft.tokens if draft is not None else []

    def draft(self, rid: int, max_draft: int) -> Draft | None:
        """The chosen draft with its match statistics (None for an unknown request)."""
        req = self._requests.get(rid)
        if req is None or max_draft <= 0 or not _ready(req):
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
        _ready(req, wait=True)
        if req.output:
            self._global.add(req.output)
        context = np.concatenate([req.prompt, np.asarray(req.output, dtype=np.int32)])
        self._park(_park_key(req.session, context), _Parked(req.tree, context, req.stale))

    # -- sessions ------------------------------------------------------------------------------

    def _tree_for(self, session: str, prompt: np.ndarray
                  ) -> tuple[SuffixTree, int, Callable[[], None], int]:
        """The request's tree, its stale tokens, the call that indexes the prompt into it and
        how many tokens that call indexes: the session's parked tree extended past the common
        prefix, or a new tree."""
        parked = self._parked.pop(_park_key(session, prompt), None)
        if parked is not None:
            self._parked_tokens -= parked.tree.num_tokens
            kept = _common_prefix(parked.context, prompt)
            stale = parked.stale + len(parked.context) - kept
            grown = parked.tree.num_tokens + len(prompt) - kept
            if stale <= self.params.max_stale_fraction * grown:
                new = prompt[kept:]
                return parked.tree, stale, lambda: parked.tree.extend(new), len(new)
        tree = SuffixTree(self.params.max_depth)
        return tree, 0, lambda: tree.add(prompt), len(prompt)

    def _park(self, key: str, parked: _Parked) -> None:
        older = self._parked.pop(key, None)  # a concurrent turn of the session parked first
        if older is not None:
            self._parked_tokens -= older.tree.num_tokens
        self._parked[key] = parked
        self._parked_tokens += parked.tree.num_tokens
        while self._parked_tokens > self.params.parked_tokens:
            _, dropped = self._parked.popitem(last=False)
            self._parked_tokens -= dropped.tree.num_tokens

    @property
    def num_requests(self) -> int:
        """Requests with a live tree (started, not finished)."""
        return len(self._requests)

    def indexed_tokens(self, rid: int) -> int:
        """Tokens in the request's tree (its context, plus what an earlier turn left)."""
        req = self._requests[rid]
        _ready(req, wait=True)
        return req.tree.num_tokens

    @property
    def global_tree(self) -> SuffixTree:
        return self._global

    @property
    def parked_tokens(self) -> int:
        return self._parked_tokens


def _ready(req: _Request, wait: bool = False) -> bool:
    """Whether the request's tree holds its context; once its prompt is indexed, the tokens
    accepted meanwhile join it. With `wait`, until then."""
    if req.indexing is None:
        return True
    if not (wait or req.indexing.done()):
        return False
    req.indexing.result()  # re-raises what the indexing raised
    req.indexing = None
    req.tree.extend(req.waiting)
    req.waiting = []
    return True


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
