"""Grammar-constrained decoding with llguidance: JSON schemas, any JSON object, Lark grammars.

Why llguidance: a maintained Rust core with Python bindings; it reads HF tokenizers; Lark
grammars may embed JSON schemas (`%json {...}`), which is what a forced tool call in a model's
own markup needs; masks are computed incrementally (an Earley parser over a lazily built
lexer, typically well under a millisecond a token) in Rust threads that drop the GIL; matchers
roll back, so speculative drafts can be checked and undone; it needs no torch build.

Lifecycle (engine.py): `GrammarCompiler.submit` compiles a request's constraint on a worker
thread (the request waits, outside the scheduler, until it is done; a bad grammar is an error
naming the problem). `Grammars` holds the running requests' matchers: each step it fills the
token bitmask of the constrained rows on the host (`bitmask`) and advances each matcher by the
committed token (`advance`). The end-of-sequence ids are allowed only where the grammar may end.
"""

from __future__ import annotations

import json
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from appliance.engine.protocol import Constraint

KINDS = ("json_schema", "json_object", "lark")
# JSON is laid out as Python's json.dumps does (", " and ": ", no other whitespace): with free
# whitespace a weak model can pad forever, and the output is the same text either way.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def check_constraint(constraint: Constraint) -> None:
    if constraint.kind not in KINDS:
        raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}, got {constraint.kind!r}")


def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar of a constraint; ValueError naming the problem."""
    check_constraint(constraint)
    if constraint.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(constraint.spec)
    if constraint.kind == "json_object":
        schema: object = {"type": "object"}
    else:
        try:
            schema = json.loads(constraint.spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema: the schema is not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("json_schema: the schema must be a JSON object")
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)


def check_grammar(constraint: Constraint) -> None:
    """ValueError naming the problem unless the constraint compiles (without a tokenizer: what
    the frontend checks before a request reaches the engine)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar_of(constraint))
    if is_error:
        raise ValueError(f"{constraint.kind}: {messages[0].strip()}")


def build_tokenizer(tokenizer_path: str, vocab_size: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer, sized to the logits (ids past the tokenizer's
    own vocabulary are never allowed); every end-of-sequence id ends a grammar. Text a grammar
    forces is tokenized without added tokens (`TextOnlyTokenization`)."""
    text = tokenizer_json(tokenizer_path)
    try:
        hf_view = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos_ids))
        eos: int | list[int] = list(eos_ids)
    except TypeError:  # llguidance < 1.9 (the newest wheel for some glibc) takes one id: the
        # grammar then ends on the first; the others are masked where it must end
        hf_view = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=eos_ids[0])
        eos = eos_ids[0]
    return llguidance.LLTokenizer(TextOnlyTokenization(hf_view, eos_ids[0]), n_vocab=vocab_size,
                                  eos_token=eos)


def tokenizer_json(folder: str) -> str:
    """The folder's fast tokenizer as llguidance reads it (HF tokenizers' JSON): tokenizer.json
    with the added tokens tokenizer_config.json declares and it lacks (what transformers'
    AutoTokenizer adds), without padding or truncation.

    Read with the `tokenizers` library, not transformers: importing transformers is seconds of
    Python (on the H100 box ~6 s, scanning every installed package's files) that held the GIL
    against start-up's CUDA-graph capture on the main thread (scripts/gpu_startup SAMPLE=1: the
    capture took 6-11 s instead of 1 s). Only a folder without tokenizer.json (a slow tokenizer
    transformers converts) goes through transformers."""
    from tokenizers import AddedToken, Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        from transformers import AutoTokenizer

        backend = getattr(AutoTokenizer.from_pretrained(folder), "backend_tokenizer", None)
        if backend is None:   # llguidance reads only the `tokenizers` library's JSON
            raise ValueError(f"constrained decoding needs a fast tokenizer (tokenizer.json); "
                             f"{folder} has only a slow one")
        tokenizer = Tokenizer.from_str(backend.to_str())
    else:
        tokenizer = Tokenizer.from_file(str(path))
        for spec in _declared_added_tokens(Path(folder) / "tokenizer_config.json"):
            if tokenizer.token_to_id(spec["content"]) is None:
                special = spec.get("special", False)
                added = AddedToken(spec["content"], special=special,
                                   single_word=spec.get("single_word", False),
                                   lstrip=spec.get("lstrip", False),
                                   rstrip=spec.get("rstrip", False),
                                   normalized=spec.get("normalized", not special))
                (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([added])
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer.to_str()


def _declared_added_tokens(config_path: Path) -> list[dict]:
    """tokenizer_config.json's `added_tokens_decoder` entries, by id."""
    if not config_path.is_file():
        return []
    declared = json.loads(config_path.read_text()).get("added_tokens_decoder") or {}
    return [declared[k] for k in sorted(declared, key=int)]


class TextOnlyTokenization:
    """llguidance's tokenizer-wrapper protocol (`tokens`, `special_token_ids`, the end and
    start ids, and a call that tokenizes text) over `hf_view`, the tokenizer llguidance builds
    from the HF one: the same tokens and special tokens, but text never tokenizes to an added
    token.

    Why: llguidance matches every added token only as a token (`<name>` in a grammar), never
    as text (a mask offers it for no literal), yet it tokenizes the text a grammar forces with
    the HF tokenizer, which cuts added tokens out of text. A grammar or schema whose literal
    holds "<tool_call>" (an added token of Qwen-family tokenizers) then forced that token, which
    the grammar refused once it was sampled: the request was aborted. Here each added token in
    such a tokenization is its text in ordinary tokens (llguidance's greedy tokenizer), which the
    grammar accepts; ordinary text tokenizes as before."""

    def __init__(self, hf_view: llguidance.LLTokenizer, eos_id: int) -> None:
        self._view = hf_view
        self.eos_token_id, self.bos_token_id = eos_id, None
        ids = range(hf_view.vocab_size)
        self.tokens = [hf_view.decode_bytes([i]) for i in ids]
        self.special_token_ids = [i for i in ids if hf_view.is_special_token(i)]
        self._special = frozenset(self.special_token_ids)
        self._as_text: dict[int, list[int]] = {}
        self.is_tokenizer_wrapper = True

    def __call__(self, text: str | bytes) -> list[int]:
        ids = (self._view.tokenize_bytes(text) if isinstance(text, bytes)
               else self._view.tokenize_str(text))
        if not self._special.intersection(ids):
            return ids
        return [t for i in ids for t in (self._text_tokens(i) if i in self._special else (i,))]

    def _text_tokens(self, token: int) -> list[int]:
        if token not in self._as_text:
            name = self.tokens[token].decode("utf-8", errors="replace")
            self._as_text[token] = self._view.greedy_tokenize(name)
        return self._as_text[token]


def compile_matcher(tokenizer: llguidance.LLTokenizer, constraint: Constraint) -> llguidance.LLMatcher:
    matcher = llguidance.LLMatcher(tokenizer, grammar_of(constraint), log_level=0)
    if matcher.is_error():
        raise ValueError(f"{constraint.kind}: {matcher.get_error()}")
    return matcher


class GrammarCompiler:
    """Compiles constraints off the step loop, on one worker thread, where the tokenizer is
    built first. Building it walks the vocabulary in Python (`TextOnlyTokenization`), which
    holds the GIL against the step loop (the first request after start-up decoded at a third
    of its speed while it ran, when the build also imported transformers), so rank 0 starts
    the compiler before the weights load and waits for the tokenizer (`wait_for_tokenizer`)
    before it says it is ready."""

    def __init__(self, tokenizer_path: str | None, vocab_size: int, eos_ids: list[int]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._tokenizer: Future | None = None
        if tokenizer_path is not None:
            self._tokenizer = self._pool.submit(build_tokenizer, tokenizer_path, vocab_size, eos_ids)

    @property
    def available(self) -> bool:
        return self._tokenizer is not None

    def wait_for_tokenizer(self, timeout_s: float | None = None) -> None:
        """Until the tokenizer is built or failed to build (a failure is the constrained
        requests' error, raised by `submit`'s futures), or `timeout_s` passed."""
        if self._tokenizer is not None:
            futures.wait([self._tokenizer], timeout=timeout_s)

    def submit(self, constraint: Constraint) -> Future:
        """A future of the request's LLMatcher (ValueError when the constraint is bad)."""
        if self._tokenizer is None:
            raise ValueError("constrained decoding is unavailable: the engine has no tokenizer")
        tokenizer = self._tokenizer
        return self._pool.submit(lambda: compile_matcher(tokenizer.result(), constraint))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class StepBitmask:
    rows: np.ndarray  # [R] int64 batch rows
    bitmask: np.ndarray  # [R, ceil(V/32)] int32; bit j of word w allows token 32*w + j


class Grammars:
    """The running constrained requests' matchers."""

    def __init__(self, vocab_size: int) -> None:
        self.words = (vocab_size + 31) // 32
        self._matchers: dict[int, llguidance.LLMatcher] = {}
        self._executor = llguidance.LLExecutor()

    def __contains__(self, rid: int) -> bool:
        return rid in self._matchers

    def __bool__(self) -> bool:
        return bool(self._matchers)

    def add(self, rid: int, matcher: llguidance.LLMatcher) -> None:
        self._matchers[rid] = matcher

    def remove(self, rid: int) -> None:
        self._matchers.pop(rid, None)

    def advance(self, rid: int, token: int) -> str | None:
        """Consume the committed token; the matcher's error when it refuses it (only a bug can
        make it: the token was sampled under this matcher's mask)."""
        matcher = self._matchers.get(rid)
        if matcher is None or matcher.consume_token(token):
            return None
        return matcher.get_error() or f"token {token} is not allowed here"

    def bitmask(self, rows: list[tuple[int, int]], held_back: dict[int, np.ndarray]) -> StepBitmask | None:
        """The masks of `rows` ((batch row, rid) pairs) whose request still runs, computed in
        llguidance's threads. `held_back`: batch row -> stop ids that min_tokens forbids; they
        are cleared unless they are all the grammar allows (a grammar that can only end ends)."""
        live = [(row, self._matchers[rid]) for row, rid in rows if rid in self._matchers]
        if not live:
            return None
        bitmask = np.empty((len(live), self.words), np.int32)
        llg_numpy.fill_next_token_bitmask_par(self._executor, [(m, i) for i, (_, m) in enumerate(live)],
                                              bitmask)
        for i, (row, _) in enumerate(live):
            if row in held_back:
                clear_unless_all(bitmask[i], held_back[row])
        return StepBitmask(np.array([row for row, _ in live], np.int64), bitmask)

    def draft_bitmask(self, rid: int, drafts: list[int]) -> tuple[np.ndarray, int]:
        """For speculative decoding: the masks at the current state and after each draft token
        the grammar accepts ([1 + accepted, W]), and how many drafts it accepts (the first one
        it forbids and everything after it are rejected). The matcher is left as it was."""
        matcher = self._matchers[rid]
        masks = np.empty((len(drafts) + 1, self.words), np.int32)
        llg_numpy.fill_next_token_bitmask(matcher, masks, 0)
        accepted = recorded = 0
        for token in drafts:
            # a stopped matcher takes the end of sequence without recording it: not rolled back
            stopped = matcher.is_stopped()
            if not allows(masks[accepted], token) or not matcher.consume_token(token):
                break
            accepted += 1
            recorded += not stopped
            llg_numpy.fill_next_token_bitmask(matcher, masks, accepted)
        matcher.rollback(recorded)
        return masks[:accepted + 1], accepted


def allows(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


def clear_unless_all(mask: np.ndarray, ids: np.ndarray) -> None:
    """mask [W] int32 in place: clear the bits of `ids`, unless that clears every bit."""
    kept = mask.copy()
    words, bits = ids >> 5, (ids & 31).astype(np.int32)
    np.bitwise_and.at(kept, words, ~np.left_shift(np.int32(1), bits))
    if kept.any():
        mask[:] = kept
