"""Messages between the frontend and engine rank 0 (msgspec msgpack over ZeroMQ ipc://).

Tagged structs decode into exactly these types: nothing is unpickled, so a malformed message is a
decode error, never code execution.
"""

from __future__ import annotations

import msgspec

# Sampling ranges the engine refuses a request outside of (sampler.check_sampling,
# logits_processors.check_logits_processors); the frontend's fields use the same bounds, so such
# a request is a 400 before its stream starts, not an error event after it.
MIN_TOP_P = 2.0**-126  # float32's smallest normal: top_p runs in float32, and 0 keeps no token
MAX_REPETITION_PENALTY = 1e6  # and its reciprocal: float32 logits stay finite


class Constraint(msgspec.Struct, tag="constraint"):
    """What the output must match, enforced token by token (appliance/engine/constraints.py)."""

    kind: str  # "json_schema" (spec: the schema as JSON text) | "json_object" (spec "") | "lark"
    spec: str = ""  # for "lark": an llguidance Lark grammar (may embed schemas with %json {...})


class GenerateRequest(msgspec.Struct, tag="generate"):
    rid: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False  # when False, the model's end-of-sequence ids also stop the request
    session: str = ""
    user: str = ""
    constraint: Constraint | None = None
    # Per-row logits processors (appliance/engine/logits_processors.py): a request that leaves
    # them at their defaults costs its batch nothing.
    logit_bias: dict[int, float] = {}  # token id -> added to its logit
    repetition_penalty: float = 1.0  # HF semantics, over prompt + generated tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens; 0 = off
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # stop ids and EOS cannot be sampled before this many tokens
    logprobs: int | None = None  # None: off; k >= 0: the sampled token's and k alternatives'
    speculative: bool = True  # False: this request never gets draft tokens (opt-out)


class AbortRequest(msgspec.Struct, tag="abort"):
    rid: int


class ShutdownRequest(msgspec.Struct, tag="shutdown"):
    pass


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Log-probabilities under the model's raw distribution (log-softmax of its logits, before
    temperature, penalties, bias or a grammar mask: what vLLM returns by default)."""

    logprob: float  # of the sampled token
    top_ids: list[int]  # the k most probable tokens, most probable first
    top_logprobs: list[float]


class TokenOutput(msgspec.Struct, tag="token", array_like=True):
    rid: int
    token_id: int  # -1 when the event carries no token (an abort)
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    logprobs: TokenLogprobs | None = None  # only for requests that asked (one byte otherwise)
    # On a request's first output only: prompt tokens the prefix cache supplied (what the
    # scheduler's prefix_cache_hit_tokens_total counted for it); None on the others.
    cached_tokens: int | None = None


class Outputs(msgspec.Struct, tag="outputs"):
    items: list[TokenOutput]


class Rejected(msgspec.Struct, tag="rejected"):
    rid: int
    message: str


class RequestProgress(msgspec.Struct, array_like=True):
    """Where one live request stands in the scheduler (`_core.Scheduler.progress`)."""

    rid: int
    state: str  # "queued" | "prefilling" | "decoding" | "preempted"
    context_tokens: int  # prompt + generated tokens so far
    cached_tokens: int  # prompt tokens the prefix cache supplied at admission
    kv_tokens: int  # tokens whose KV is written (prefill progress)


class Stats(msgspec.Struct, tag="stats"):
    values: dict[str, float]
    requests: list[RequestProgress] = []


class Progress(msgspec.Struct, tag="progress"):
    """A start-up stage of rank 0, before `Ready` (what `tokenspeed up` shows)."""

    stage: str  # e.g. "weights", "CUDA graphs", "warm-up"
    summary: str | None = None  # None when the stage starts; what it did when it ends


class Ready(msgspec.Struct, tag="ready"):
    max_model_len: int
    num_pages: int
    page_size: int
    vocab_size: int
    eos_token_ids: list[int]
    devices: list[str] = []  # UUIDs of the GPUs of ranks 0..tp_size-1 ("GPU-..."); [] on CPU


class Failed(msgspec.Struct, tag="failed"):
    message: str


ToEngine = GenerateRequest | AbortRequest | ShutdownRequest
FromEngine = Outputs | Rejected | Stats | Progress | Ready | Failed

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_from_engine = msgspec.msgpack.Decoder(FromEngine)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_to_engine(data: bytes) -> ToEngine:
    return _to_engine.decode(data)


def decode_from_engine(data: bytes) -> FromEngine:
    return _from_engine.decode(data)
