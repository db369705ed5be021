"""What every route needs: config, engine client, tokenizer, metrics, the request tracker and
what `/stats` keeps (counter window, GPU telemetry)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import Request

from appliance.config import AppConfig
from appliance.engine.sampling_defaults import SamplingDefaults
from appliance.server.counter_window import CounterWindow
from appliance.server.gpus import GpuTelemetry
from appliance.server.tokenizer_pool import TokenizerPool
from appliance.server.tool_parsers import ToolCallFormat, select_format
from appliance.server.tracker import RequestTracker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from appliance.engine.protocol import GenerateRequest, RequestProgress, TokenOutput
    from appliance.server.metrics import FrontendMetrics


class EngineInfoLike(Protocol):
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    devices: tuple[str, ...]  # GPU UUIDs of the ranks; () on CPU


class EngineClientLike(Protocol):
    """The part of `appliance.engine.client.EngineClient` the frontend uses (INTERFACES §4)."""

    max_model_len: int
    info: EngineInfoLike

    def new_rid(self) -> int: ...
    def generate(self, req: GenerateRequest) -> AsyncIterator[list[TokenOutput]]: ...  # in batches
    async def abort(self, rid: int) -> None: ...
    def stats(self) -> dict[str, float]: ...
    def request_progress(self) -> dict[int, RequestProgress]: ...


@dataclass
class AppState:
    config: AppConfig
    client: EngineClientLike
    tokenizer: Any  # a transformers tokenizer with a chat template
    metrics: FrontendMetrics
    sampling_defaults: SamplingDefaults = SamplingDefaults()  # for the fields a request leaves out
    tracker: RequestTracker = field(default_factory=RequestTracker)
    counters: CounterWindow = field(default_factory=CounterWindow)  # /stats' last-minute figures
    started_at: float = field(default_factory=time.monotonic)
    created_at: float = field(default_factory=time.time)
    tokenizers: TokenizerPool = field(init=False)  # copies of `tokenizer` for worker threads
    eos_token_ids: tuple[int, ...] = field(init=False)
    tool_format: ToolCallFormat = field(init=False)  # the model's tool-call markup
    gpus: GpuTelemetry = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizers = TokenizerPool(self.tokenizer)
        self.eos_token_ids = _eos_token_ids(self.client, self.tokenizer)
        self.tool_format = select_format(self.config.server.tool_parser, self.tokenizer)
        self.gpus = GpuTelemetry(self.client.info.devices)

    @property
    def model_name(self) -> str:
        return self.config.model.model_name

    @property
    def vocab_size(self) -> int:
        return self.client.info.vocab_size

    @property
    def engine_healthy(self) -> bool:
        return bool(getattr(self.client, "healthy", True))

    @property
    def engine_status(self) -> str:
        """"ok" | "starting" | "restarting" | "failed" (a client without `status`: ok or failed)."""
        return getattr(self.client, "status", None) or ("ok" if self.engine_healthy else "failed")


def get_state(request: Request) -> AppState:
    return request.app.state.tokenspeed


def _eos_token_ids(client: EngineClientLike, tokenizer: Any) -> tuple[int, ...]:
    """End-of-sequence ids: the engine's (from the generation config) plus the tokenizer's."""
    ids = set(client.info.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))
