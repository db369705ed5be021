"""N-gram prompt lookup: the simplest draft source, the baseline for the others.

The longest suffix of the context (MAX_NGRAM tokens down to MIN_NGRAM) that occurred earlier
in the context proposes the tokens that followed its most recent earlier occurrence. Coding
agents re-emit what they read (edits, diffs, tool arguments), so this finds real drafts. When
the continuation runs into the end of the context (the match is a period p back: the text
repeats), the proposal keeps repeating that period, as looking up its own suffix again would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_NGRAM = 4
MIN_NGRAM = 2


@dataclass
class _Context:
    tokens: list[int] = field(default_factory=list)
    # n-gram (as a tuple; lengths MIN..MAX) -> index of the token that followed its latest
    # occurrence. An n-gram joins once its follower is known, so the context's own suffix
    # never matches itself.
    follower: dict[tuple[int, ...], int] = field(default_factory=dict)

    def append(self, new: Sequence[int]) -> None:
        start = len(self.tokens)
        self.tokens.extend(int(t) for t in new)
        t = self.tokens
        for n in range(MIN_NGRAM, MAX_NGRAM + 1):
            # n-grams t[i-n:i] whose follower index i is among the new tokens
            first = max(n, start)
            # dict.update keeps the last (latest) occurrence of a repeated n-gram
            self.follower.update(
                zip(zip(*(t[first - n + k:len(t) - n + k] for k in range(n))),
                    range(first, len(t))))


class NgramDraft:
    """`DraftSource` by prompt lookup over each request's own prompt and output."""

    def __init__(self) -> None:
        self._contexts: dict[int, _Context] = {}

    def start(self, rid: int, prompt: Sequence[int], session: str) -> None:
        ctx = _Context()
        ctx.append(prompt)
        self._contexts[rid] = ctx

    def extend(self, rid: int, tokens: Sequence[int]) -> None:
        self._contexts[rid].append(tokens)

    def propose(self, rid: int, max_draft: int) -> list[int]:
        ctx = self._contexts.get(rid)
        if ctx is None or max_draft <= 0:
            return []
        t = ctx.tokens
        for n in range(min(MAX_NGRAM, len(t)), MIN_NGRAM - 1, -1):
            at = ctx.follower.get(tuple(t[len(t) - n:]))
            if at is not None:
                period = len(t) - at
                return [t[at + i % period] for i in range(max_draft)]
        return []

    def finish(self, rid: int) -> None:
        self._contexts.pop(rid, None)
