"""Rank 0's step loop: scheduler plan -> model runner -> sampler -> commit.

The C++ scheduler owns every request and KV page; this loop only moves messages and tensors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from appliance import _core
from appliance.config import AppConfig, SchedulerPolicyConfig
from appliance.engine import protocol
from appliance.engine.channel import EngineEndpoints, connect_engine
from appliance.engine.plan_arrays import PlanArrays, PlanChannel
from appliance.engine.protocol import GenerateRequest, TokenOutput
from appliance.engine.sampler import INT32_MAX, INT64_MAX, INT64_MIN, Sampler, check_sampling
from appliance.engine.transfer import to_device

log = logging.getLogger(__name__)

# Stats go out at least this often, also when idle: they are the heartbeat the frontend's
# supervisor watches (engine.heartbeat_timeout_s), so a stuck step loop is noticed.
STATS_PERIOD_S = 0.25
IDLE_POLL_MS = 5


def core_scheduler_config(policy: SchedulerPolicyConfig, num_pages: int, page_size: int,
                          max_seq_len: int) -> _core.SchedulerConfig:
    """The C++ scheduler's config: YAML `scheduler:` passed field by field (so a new policy
    setting reaches C++ or fails here, never falls back to a second default), the KV pool the
    runner sized, and the context length."""
    return _core.SchedulerConfig(num_pages=num_pages, page_size=page_size,
                                 max_seq_len=max_seq_len, **asdict(policy))


@dataclass(frozen=True)
class InFlight:
    """A launched step: its sampled tokens on the device (the next step's placeholders read
    them) and on their way to the host (`done` marks the copy's end on CUDA)."""

    step: int
    tokens: torch.Tensor  # [B] int32, on the device
    host: torch.Tensor  # [B] int32, CPU
    done: torch.cuda.Event | None
    started: float


class Engine:
    def __init__(self, config: AppConfig, runner, channel: PlanChannel,
                 endpoints: EngineEndpoints) -> None:
        self.config = config
        self.runner = runner
        self.channel = channel
        self.device = runner.device
        self.max_model_len = min(config.model.max_model_len, runner.max_model_len)
        self.scheduler = _core.Scheduler(core_scheduler_config(
            config.scheduler, runner.num_pages, runner.page_size, self.max_model_len))
        self.sampler = Sampler(self.device)
        self.sampler.warm_up(runner.vocab_size)
        self.requests: dict[int, GenerateRequest] = {}
        self._ctx, self._inbox, self._outbox = connect_engine(endpoints)
        self._last_stats = 0.0
        self._inflight: InFlight | None = None  # the launched, not yet committed step

    def run(self) -> None:
        self._send(protocol.Ready(self.max_model_len, self.runner.num_pages, self.runner.page_size,
                                  self.runner.vocab_size, list(self.runner.eos_token_ids)))
        try:
            ran = False
            # Block on the inbox when idle, or when the scheduler holds requests back (waiting
            # for pages or for the TPS floor) so the loop does not spin.
            while self._drain_inbox(block=not ran):
                ran = (bool(self.requests) or self._inflight is not None) and self.step()
                self._publish_stats()
            # A clean stop ends what still runs with "abort". After a crash nothing is sent: an
            # abort would read as a normal end, and the frontend fails them with a clear error.
            for rid in list(self.requests):
                self._abort(rid)
            self._publish_stats(force=True)
            self.channel.send_stop()
        finally:
            self._inbox.close(linger=0)
            self._outbox.close(linger=1000)
            self._ctx.term()

    def step(self) -> bool:
        """Launch the next batch, then commit the one launched before it: the scheduler plans
        step N+1 (its decodes read step N's tokens through placeholders, resolved on the
        device) while the GPU still runs step N, so host work stays off the GPU's critical
        path. False when there was nothing to launch or commit."""
        plan = self.scheduler.plan()
        launched = self._launch(plan) if plan is not None else None
        committed = self._inflight is not None
        if committed:
            self._commit(self._inflight)
        self._inflight = launched
        return launched is not None or committed

    def _launch(self, plan) -> InFlight:
        started = time.perf_counter()
        arrays = PlanArrays.from_plan(plan)
        rids = np.array(plan.rids, dtype=np.int64)
        self.channel.send(arrays)
        prev = self._inflight.tokens if self._inflight is not None else None
        batch = to_forward_batch(arrays, self.device, prev)
        logits = self.runner.forward(batch)
        tokens = self.sampler.sample(logits, rids, arrays, self.requests)       # [B] int32
        host = tokens.to("cpu", non_blocking=True)
        done = torch.cuda.Event() if self.device.type == "cuda" else None
        if done is not None:
            done.record()
        return InFlight(arrays.step, tokens, host, done, started)

    def _commit(self, step: InFlight) -> None:
        if step.done is not None:
            step.done.synchronize()
        tokens = step.host.numpy().astype(np.int32)
        events = self.scheduler.commit(step.step, tokens, time.perf_counter() - step.started)
        self._emit(events)

    # --- messages ------------------------------------------------------------------------------
    def _drain_inbox(self, block: bool) -> bool:
        """Apply every pending message; False once shutdown was asked for."""
        timeout = IDLE_POLL_MS if block else 0
        while self._inbox.poll(timeout):
            timeout = 0
            try:
                message = protocol.decode_to_engine(self._inbox.recv())
            except Exception as e:  # a malformed message must not take the engine down
                log.error("dropping a malformed message: %s", e)
                continue
            if isinstance(message, protocol.ShutdownRequest):
                return False
            if isinstance(message, protocol.AbortRequest):
                self._abort(message.rid)
            else:
                self._submit(message)
        return True

    def _submit(self, req: GenerateRequest) -> None:
        """Hand a request to the scheduler, or refuse it (that request alone) with a Rejected:
        whatever its fields hold, nothing of it may raise later inside a step."""
        try:
            self._check_request(req)
            check_sampling(req)
            stop_ids = list(req.stop_token_ids)
            if not req.ignore_eos:
                stop_ids += self.runner.eos_token_ids
            self.scheduler.submit(req.rid, np.asarray(req.prompt_ids, dtype=np.int32),
                                  req.max_new_tokens, np.asarray(stop_ids, dtype=np.int32),
                                  req.session)
        except (ValueError, TypeError, OverflowError) as e:  # the binding's conversions raise the last two
            self._send(protocol.Rejected(req.rid, str(e)))
            return
        self.requests[req.rid] = req
        self.sampler.add(req)

    def _check_request(self, req: GenerateRequest) -> None:
        """ValueError unless the ids and counts fit the scheduler's int32 / int64 arguments."""
        vocab = self.runner.vocab_size
        if not INT64_MIN <= req.rid <= INT64_MAX:
            raise ValueError(f"request id {req.rid} does not fit in a signed 64-bit integer")
        if req.rid in self.requests:
            raise ValueError(f"request id {req.rid} is already running")
        if not 1 <= req.max_new_tokens <= INT32_MAX:
            raise ValueError(f"max_new_tokens must be in [1, {INT32_MAX}], got {req.max_new_tokens}")
        for name, ids in (("prompt", req.prompt_ids), ("stop", req.stop_token_ids)):
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"{name} token ids must be in [0, {vocab})")

    def _abort(self, rid: int) -> None:
        if self.requests.pop(rid, None) is None:
            return
        self.scheduler.abort(rid)
        self.sampler.remove(rid)
        self._send(protocol.Outputs([TokenOutput(rid, -1, "abort")]))

    def _emit(self, events: list[tuple[int, int, str]]) -> None:
        items = []
        for rid, token, reason in events:
            if rid not in self.requests:
                continue
            items.append(TokenOutput(rid, token, reason or None))
            if reason:
                del self.requests[rid]
                self.sampler.remove(rid)
        if items:
            self._send(protocol.Outputs(items))

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < STATS_PERIOD_S:
            return
        self._last_stats = now
        values = {k: float(v) for k, v in self.scheduler.stats().items()}
        values["page_size"] = float(self.runner.page_size)
        self._send(protocol.Stats(values))

    def _send(self, message) -> None:
        self._outbox.send(protocol.encode(message))


def to_forward_batch(arrays: PlanArrays, device: torch.device,
                     prev_tokens: torch.Tensor | None = None):
    """The plan's arrays as the model runner's ForwardBatch on `device` (one copy). Placeholder
    input ids -(r+1) become the token row r of the previous step sampled: looked up in
    `prev_tokens` on rank 0, then broadcast over the TP group (a stream-ordered device
    collective: no host sync), so every rank runs the same ids."""
    from appliance.model import ForwardBatch

    names = ("input_ids", "positions", "query_start", "prefix_lens", "seq_lens", "slot_mapping")
    parts = [getattr(arrays, n) for n in names] + [arrays.page_table.ravel()]
    flat = to_device(torch.from_numpy(np.concatenate(parts)), device)   # [sum of sizes] int32
    views = dict(zip(names + ("page_table",), flat.split([len(p) for p in parts])))
    input_ids = views["input_ids"]                                       # [T]
    if arrays.input_ids.min(initial=0) < 0:
        if prev_tokens is not None:
            rows = (-input_ids - 1).clamp(min=0).long()
            input_ids = torch.where(input_ids < 0, prev_tokens[rows], input_ids)
        if dist.is_initialized() and dist.get_world_size() > 1:
            input_ids = input_ids.contiguous()
            dist.broadcast(input_ids, 0)
    return ForwardBatch(
        input_ids=input_ids, positions=views["positions"], query_start=views["query_start"],
        prefix_lens=views["prefix_lens"], seq_lens=views["seq_lens"],
        page_table=views["page_table"].view(arrays.page_table.shape),
        slot_mapping=views["slot_mapping"], num_decode=arrays.num_decode,
        extend_keys_host=int(arrays.seq_lens[arrays.num_decode:].sum()))


def run_worker(runner, channel: PlanChannel) -> None:
    """Ranks > 0: run every plan rank 0 broadcasts, until it says stop."""
    while (arrays := channel.receive()) is not None:
        runner.forward(to_forward_batch(arrays, runner.device))
