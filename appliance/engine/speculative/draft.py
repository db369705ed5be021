"""The draft-source interface: where speculative tokens come from.

A draft source proposes a chain of tokens that likely continues a request; the target model
verifies the chain in one step (appliance/engine/verify.py) and the engine feeds the accepted
tokens back. Sources that read only token ids (n-gram lookup, suffix trees) implement exactly
this Protocol. A source that needs the target's hidden states (MTP heads, an EAGLE draft
model) implements it too: the engine hands it the states through its own method before
`propose`, so the verifier, the scheduler and the engine loop stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class DraftSource(Protocol):
    def start(self, rid: int, prompt: Sequence[int], session: str) -> None:
        """A request begins: index its prompt (`session` groups an agent's turns; may be "")."""

    def extend(self, rid: int, tokens: Sequence[int]) -> None:
        """Tokens the target accepted for `rid` (in order, after the prompt and earlier ones)."""

    def propose(self, rid: int, max_draft: int) -> list[int]:
        """A chain of at most `max_draft` tokens that likely follows the context; [] for none."""

    def finish(self, rid: int) -> None:
        """The request is done or aborted: free its state (a source may keep what it learned
        globally, e.g. its output for the session's next turn)."""
