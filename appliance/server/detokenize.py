"""Incremental detokenization: token ids in, text deltas out, never a broken character.

Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character, and some tokenizers
merge text across token boundaries, so decoding one token at a time is wrong. We decode a short
sliding window of ids twice (the part already emitted, and the whole window) and emit only the new
suffix, holding it back while it ends in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 4  # prompt ids decoded with the first outputs (leading-space handling)


class IncrementalDetokenizer:
    """Feeds one token id at a time; `push` returns the newly stable text (maybe "")."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (),
                 keep_special: frozenset[str] = frozenset()) -> None:
        """Special tokens are left out of the text, except those whose text is in
        `keep_special` (a tool-call format's markup, e.g. `<|tool_calls_section_begin|>`)."""
        self._decode_ids = _fast_decoder(tokenizer)
        self._skip_ids = _special_ids(tokenizer, keep_special) if keep_special else None
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(self._ids)  # ids before this were emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is still held back (the stream ended), even an incomplete character."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix_offset:self._read_offset])
        window = self._decode(self._ids[self._prefix_offset:])
        if len(window) <= len(emitted) or (window.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        delta = window[len(emitted):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def _decode(self, ids: list[int]) -> str:
        if self._skip_ids is None:
            return self._decode_ids(ids, True) if ids else ""
        ids = [i for i in ids if i not in self._skip_ids]
        return self._decode_ids(ids, False) if ids else ""


def _special_ids(tokenizer: Any, keep: frozenset[str]) -> frozenset[int]:
    """Ids of the tokenizer's special added tokens, but for those whose text is in `keep`."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(i for i, token in added.items() if token.special and token.content not in keep)


def _fast_decoder(tokenizer: Any) -> Callable[[list[int], bool], str]:
    """The Rust tokenizer's decode when there is one (5x less overhead per call than the
    transformers wrapper, same text without clean-up), else the wrapper's."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip,
                                              clean_up_tokenization_spaces=False)
