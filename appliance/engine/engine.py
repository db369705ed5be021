"""Rank 0's step loop: scheduler plan -> model runner -> sampler -> commit.

The C++ scheduler owns every request and KV page; this loop only moves messages and tensors.
With speculation on, a step may carry verify rows (a request's next token and its drafts):
the sampler draws at each of their tokens, the verifier counts the accepted run, and commit
takes each row's run.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from appliance import _core
from appliance.config import AppConfig, SchedulerPolicyConfig
from appliance.engine import protocol
from appliance.engine.channel import EngineEndpoints, connect_engine
from appliance.engine.constraints import GrammarCompiler, Grammars, check_constraint
from appliance.engine.logits_processors import check_logits_processors
from appliance.engine.logprobs import Logprobs, check_logprobs
from appliance.engine.plan_arrays import PlanArrays, PlanChannel
from appliance.engine.protocol import GenerateRequest, TokenOutput
from appliance.engine.sampler import (INT32_MAX, INT64_MAX, INT64_MIN, SampleRows, Sampler,
                                      check_sampling)
from appliance.engine.speculative import make_speculator
from appliance.engine.speculative.mtp import Following, MTPDraft, NextTokenPass
from appliance.engine.speculative.policy import StepCost
from appliance.engine.step_timing import PredictionError, timeline_from_env
from appliance.engine.transfer import to_device, to_device_packed
from appliance.engine.verify import LogitLayout, Verifier, verify_bitmask
from appliance.model.late_compiles import LateCompiles

log = logging.getLogger(__name__)

# Stats go out at least this often, also when idle: they are the heartbeat the frontend's
# supervisor watches (engine.heartbeat_timeout_s), so a stuck step loop is noticed.
STATS_PERIOD_S = 0.25
IDLE_POLL_MS = 5
# Ready waits this long at most for the constraint tokenizer (GrammarCompiler), then serves.
TOKENIZER_WAIT_S = 60.0


def core_scheduler_config(policy: SchedulerPolicyConfig, num_pages: int, page_size: int,
                          max_seq_len: int) -> _core.SchedulerConfig:
    """The C++ scheduler's config: YAML `scheduler:` passed field by field (so a new policy
    setting reaches C++ or fails here, never falls back to a second default), the KV pool the
    runner sized, and the context length."""
    return _core.SchedulerConfig(num_pages=num_pages, page_size=page_size,
                                 max_seq_len=max_seq_len, **asdict(policy))


@dataclass(frozen=True)
class Forwarded:
    """A step whose forward is launched and whose sampler is not yet."""

    step: int
    logits: torch.Tensor  # [N, V] float32, on the device (N = B + drafts)
    rows: SampleRows  # one per logits row
    layout: LogitLayout | None  # the step's verify rows (None: it has none)
    num_draft: np.ndarray  # [B] int32
    started: float
    mtp: "MTPInputs | None" = None  # what the MTP pass needs after sampling (MTP drafts)


@dataclass(frozen=True)
class MTPInputs:
    """A step's batch, its hidden states and which token follows each of its tokens."""

    batch: object  # the ForwardBatch
    hidden: torch.Tensor  # [T, H]
    arrays: PlanArrays
    following: Following


@dataclass(frozen=True)
class InFlight:
    """A launched step: each row's first sampled token on the device (the next step's
    placeholders read them), and its tokens on their way to the host, one per logits row, with
    each verify row's count and the log-probabilities asked for (`done` marks the copies' end
    on CUDA)."""

    step: int
    rids: np.ndarray  # [N] int64: the request of each logits row
    tokens: torch.Tensor  # [B] int32, on the device
    host: torch.Tensor  # [N] int32, CPU
    counts: torch.Tensor | None  # [B] int32, CPU: tokens each row emits (None: one each)
    num_draft: np.ndarray  # [B] int32
    logprobs: Logprobs | None  # CPU
    done: torch.cuda.Event | None
    started: float
    chains: torch.Tensor | None = None  # [B, 2 + k] int32, CPU: MTP drafts (MTPDraft.offer)


class Engine:
    def __init__(self, config: AppConfig, runner, channel: PlanChannel,
                 endpoints: EngineEndpoints, tokenizer: str | None = None,
                 compiler: GrammarCompiler | None = None) -> None:
        """`tokenizer`: the model's tokenizer folder, which grammar constraints need (without
        it a request with a constraint is refused); or `compiler`, one already building it
        (rank 0 starts it before the weights load)."""
        self.config = config
        self.runner = runner
        self.channel = channel
        self.device = runner.device
        self.max_model_len = min(config.model.max_model_len, runner.max_model_len)
        self.scheduler = _core.Scheduler(core_scheduler_config(
            config.scheduler, runner.num_pages, runner.page_size, self.max_model_len))
        self.sampler = Sampler(self.device, runner.vocab_size)
        self.sampler.warm_up(runner.vocab_size)
        self.requests: dict[int, GenerateRequest] = {}
        self._unadmitted: set[int] = set()  # submitted, not yet in a plan
        self._cached_tokens: dict[int, int] = {}  # admitted, first output not yet sent
        self.compiler = compiler or GrammarCompiler(tokenizer, runner.vocab_size,
                                                    list(runner.eos_token_ids))
        self.compiling: dict[int, tuple[GenerateRequest, Future]] = {}  # waiting for their grammar
        self.grammars = Grammars(runner.vocab_size)
        self.verifier = Verifier(self.device)
        self.speculator = make_speculator(config.speculative)
        # MTP drafts: the model's next-token layer runs after every step (speculative/mtp.py)
        self.next_token = (NextTokenPass(runner, channel.group)
                           if self.speculator is not None
                           and isinstance(self.speculator.source, MTPDraft) else None)
        self._speculating = False  # the next step plans drafts (after the previous commit)
        self._next_cost = StepCost(tokens=1.0, time_s=1.0, draft_token_s=0.0)
        self._ctx, self._inbox, self._outbox = connect_engine(endpoints)
        self._last_stats = 0.0
        self._unsent: list[TokenOutput] = []  # a commit's outputs, until `_send_outputs`
        self._unsent_finished = False  # ... and whether a request ended in them
        self._unsent_failed: list[protocol.Rejected] = []  # ... and those failed after them
        # a request ended in the last outputs sent: the step in flight behind them may still
        # hold its pages (planned before its end was known), so the next commit's stats too
        self._stats_after_next_commit = False
        self._inflight: InFlight | None = None  # the launched, not yet committed step
        self.step_error = PredictionError()  # the cost model's, for /stats
        self._last_done = 0.0  # perf_counter when the last committed step's tokens were in
        self.timeline = timeline_from_env(self.device)  # per-step profile; a no-op unless asked
        self.late_compiles = LateCompiles()  # kernel variants start-up missed (after Ready)

    def run(self) -> None:
        self.compiler.wait_for_tokenizer(TOKENIZER_WAIT_S)
        if self.device.type == "cuda":
            self.late_compiles.install()
        self._send(protocol.Ready(self.max_model_len, self.runner.num_pages, self.runner.page_size,
                                  self.runner.vocab_size, list(self.runner.eos_token_ids),
                                  gpu_uuids(self.device, self.config.parallel.tp_size)))
        try:
            ran = False
            # Block on the inbox when idle, or when the scheduler holds requests back (waiting
            # for pages or for the TPS floor) so the loop does not spin.
            while self._drain_inbox(block=not ran):
                ran = (bool(self.requests) or self._inflight is not None) and self.step()
                if not ran:  # a plan drops session pins past their TTL; idle, nothing plans
                    self.scheduler.expire_sessions()
                self._publish_stats()
            # A clean stop ends what still runs with "abort". After a crash nothing is sent: an
            # abort would read as a normal end, and the frontend fails them with a clear error.
            for rid in [*self.requests, *self.compiling]:
                self._abort(rid)
            self._publish_stats(force=True)
            self.channel.send_stop()
        finally:
            self.late_compiles.remove()
            self.timeline.write()
            self.compiler.close()
            self._inbox.close(linger=0)
            self._outbox.close(linger=1000)
            self._ctx.term()

    def step(self) -> bool:
        """Launch the next batch, then commit the one launched before it: the scheduler plans
        step N+1 (its decodes read step N's tokens through placeholders, resolved on the
        device) while the GPU still runs step N, so host work stays off the GPU's critical
        path. A batch with grammar-constrained rows launches its forward, commits step N (its
        tokens advance the grammars), computes the masks on the host while the GPU runs the
        forward, then launches the sampler; other batches launch forward and sampler at once.
        While requests speculate, drafts must follow their committed tokens: the step in flight
        is committed first (no overlap then). False when there was nothing to launch or
        commit."""
        if self._speculating:
            return self._step_with_drafts()
        self.timeline.begin()
        plan = self._plan()
        forwarded = self._forward(plan) if plan is not None else None
        launched = None
        if forwarded is not None and not forwarded.rows.constrained:
            launched = self._sample(forwarded)
        committed = self._inflight is not None
        if committed:
            self._commit(self._inflight)
            self._send_outputs()
        if forwarded is not None and launched is None:
            launched = self._sample(forwarded)
        self._inflight = launched
        self.timeline.end()
        return launched is not None or committed

    def _step_with_drafts(self) -> bool:
        self.timeline.begin()
        committed = self._inflight is not None
        if committed:
            self._commit(self._inflight)
            self._inflight = None
        if self._speculating:  # proposed after that commit, with nothing in flight: current
            self.speculator.hand_to(self.scheduler)
        plan = self._plan()
        self._inflight = self._sample(self._forward(plan)) if plan is not None else None
        self._send_outputs()  # the commit's tokens go out while the GPU runs the next step
        self.timeline.end()
        return committed or self._inflight is not None

    def _plan(self):
        """The scheduler's next plan (None: nothing to run), noted by the step instruments."""
        plan = self.scheduler.plan()
        if plan is not None:
            self.step_error.planned(plan.step, plan.predicted_time_s)
        self.timeline.planned(plan)
        if plan is not None and self._unadmitted:
            self._note_admissions(plan)
        return plan

    def _note_admissions(self, plan) -> None:
        """Each newly admitted request's prefix-cache hit, for its first output."""
        for rid in plan.rids[plan.num_decode:].tolist():
            if rid in self._unadmitted:
                self._unadmitted.discard(rid)
                self._cached_tokens[rid] = self.scheduler.cached_tokens(rid) or 0

    def _forward(self, plan) -> Forwarded:
        started = time.perf_counter()
        arrays = PlanArrays.from_plan(plan)
        rids = np.array(plan.rids, dtype=np.int64)
        self.channel.send(arrays)
        prev = self._inflight.tokens if self._inflight is not None else None
        layout = LogitLayout.of(arrays) if arrays.has_drafts else None
        batch = to_forward_batch(arrays, self.device, prev,
                                 layout.index if layout is not None else None)
        self.timeline.forward_starts(arrays.step)
        mtp = None
        if self.next_token is None:
            logits = self.runner.forward(batch)                                     # [N, V]
        else:
            logits, hidden = self.runner.forward_hidden(batch)                      # [T, H]
            mtp = MTPInputs(batch, hidden, arrays,
                            self.speculator.source.following(rids, arrays, layout))
        if layout is None:
            rows = self.sampler.prepare(rids, arrays, self.requests, self.grammars)
        else:  # every logits row samples the token at its own position
            rows = self.sampler.prepare(rids, layout.per_logit_row(arrays), self.requests,
                                        self.grammars, layout=layout)
        if self.speculator is not None:
            self._next_cost = self._cost_without_drafts(plan, float(arrays.sample.sum()))
        return Forwarded(arrays.step, logits, rows, layout, arrays.num_draft, started, mtp)

    def _cost_without_drafts(self, plan, tokens: float) -> StepCost:
        """What the next step's drafts are weighed against: this step as if it had none (its
        predicted time less its drafts' cost). Where plain decode steps replay CUDA graphs,
        drafts also bring an extend step's fixed cost f (the cost model's: an eager step's
        launches, or an extend graph's padding; none when prefill makes the step an extend
        step anyway), and no more drafts than the extend graphs have room for beside the
        step's rows; without graphs (the CPU) every step runs eagerly.

        A draft token does a decode token's work (the weights, attention over its row's
        prefix), so it is charged at most that: b + d * the rows' mean length. The fitted e
        can say more and stay there: the first verify steps ride on mixed steps whose prefill
        the linear model leaves partly unexplained, and a policy that then refuses drafts
        gives e no new evidence (the CPU edit workload at 8 users: e held at 45-50 ms for a
        whole run, while a draft token cost ~3 ms)."""
        c = self.scheduler.cost_coeffs()
        lengths = np.asarray(plan.seq_lens)
        decode_token_s = c[1] + c[3] * (float(lengths.mean()) if lengths.size else 0.0)
        e, f = min(c[4], decode_token_s), c[5]
        time_s = plan.predicted_time_s - e * plan.total_drafts
        if getattr(self.runner, "decode_graphs", None) is None:
            return StepCost(tokens=tokens, time_s=time_s, draft_token_s=e)
        prefill = plan.num_tokens > plan.num_rows + plan.total_drafts
        if plan.total_drafts and not prefill:
            time_s -= f
        extend = getattr(self.runner, "extend_graphs", None)
        return StepCost(tokens=tokens, time_s=time_s, draft_token_s=e,
                        eager_s=0.0 if prefill else f, graphs=True,
                        max_drafts=extend.draft_room(plan.num_rows) if extend else None)

    def _sample(self, fwd: Forwarded) -> InFlight:
        held_back = fwd.rows.processors.held_back if fwd.rows.processors is not None else {}
        bitmask = None
        if fwd.rows.constrained and fwd.layout is None:
            bitmask = self.grammars.bitmask(fwd.rows.constrained, held_back)
        elif fwd.rows.constrained:  # masks after each draft: a draft the grammar forbids fails
            bitmask = verify_bitmask(fwd.rows.constrained, held_back, fwd.layout, self.grammars)
        sampled = self.sampler.sample(fwd.logits, fwd.rows, bitmask)               # [N]
        counts = first = None
        if fwd.layout is not None:
            counts, first = self.verifier.accept(sampled.tokens, fwd.layout)
            self.sampler.count_emitted(sampled, counts)
        chains = None
        if fwd.mtp is not None:
            chains = self._mtp_chains(fwd, sampled.tokens, counts).to("cpu", non_blocking=True)
        host = sampled.tokens.to("cpu", non_blocking=True)
        counts_host = counts.to("cpu", non_blocking=True) if counts is not None else None
        logprobs = sampled.logprobs.to_host() if sampled.logprobs is not None else None
        done = torch.cuda.Event() if self.device.type == "cuda" else None
        if done is not None:
            done.record()
        self.timeline.sampler_launched(fwd.step)
        return InFlight(fwd.step, fwd.rows.rids, sampled.tokens if first is None else first,
                        host, counts_host, fwd.num_draft, logprobs, done, fwd.started, chains)

    def _mtp_chains(self, fwd: Forwarded, sampled: torch.Tensor,
                    counts: torch.Tensor | None) -> torch.Tensor:
        """The MTP pass over a sampled step: each row's draft chain, on the device."""
        last_logit = None
        if counts is not None:  # a verify row's last accepted token
            start, = to_device_packed([torch.from_numpy(fwd.layout.start[:-1])], self.device)
            last_logit = start + counts - 1
        m = fwd.mtp
        return self.next_token.launch(m.batch, m.hidden, m.arrays, m.following, sampled,
                                      last_logit, self.speculator.source.depth)

    def _commit(self, step: InFlight) -> None:
        if step.done is not None:
            step.done.synchronize()
        self.timeline.mark("wait")
        tokens = step.host.numpy().astype(np.int32)
        counts = step.counts.numpy().astype(np.int32) if step.counts is not None else None
        # The step's own time, what the cost model fits: from when it could run (launched, and
        # the step before it done: one step is in flight behind another) to its tokens.
        done = time.perf_counter()
        measured = done - max(step.started, self._last_done)
        self._last_done = done
        events = self.scheduler.commit(step.step, tokens, measured, counts)
        self.step_error.committed(step.step, measured)
        self.timeline.committed(step.step, measured)
        logprobs: dict[int, list[protocol.TokenLogprobs]] = {}
        if step.logprobs is not None:  # a verify row's logits rows in chain order: its tokens'
            for row, lp in sorted(step.logprobs.by_row().items()):
                logprobs.setdefault(int(step.rids[row]), []).append(lp)
        emitted = self._emit(events, logprobs)
        self.timeline.mark("emit")
        if self.speculator is None:
            return
        row_rids = step.rids[np.cumsum(step.num_draft + 1) - step.num_draft - 1]       # [B]
        if step.chains is not None:
            self.speculator.source.offer(row_rids, step.chains.numpy())
        verified = []
        if counts is not None:
            verified = [(int(r), int(k), int(n) - 1)
                        for r, k, n in zip(row_rids, step.num_draft, counts) if k > 0]
        self.speculator.committed(emitted, verified, len(step.num_draft), measured)
        self._speculating = self.speculator.propose(self._next_cost, self._grammar_allows)

    def _grammar_allows(self, rid: int, drafts: list[int]) -> int:
        """How many of `rid`'s drafts its grammar accepts (all, without a grammar)."""
        return self.grammars.draft_bitmask(rid, drafts)[1] if rid in self.grammars else len(drafts)

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
        self._admit_compiled()
        return True

    def _submit(self, req: GenerateRequest) -> None:
        """Hand a request to the scheduler, or refuse it (that request alone) with a Rejected:
        whatever its fields hold, nothing of it may raise later inside a step. A request with
        a constraint first waits for its grammar (`_admit_compiled`)."""
        try:
            self._check_request(req)
            if req.constraint is not None:
                self.compiling[req.rid] = (req, self.compiler.submit(req.constraint))
                return
        except ValueError as e:
            self._send(protocol.Rejected(req.rid, str(e)))
            return
        self._admit(req)

    def _admit_compiled(self) -> None:
        """Admit the requests whose grammar compiled; refuse those whose grammar is bad."""
        for rid, (req, future) in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[rid]
            try:
                matcher = future.result()
            except ValueError as e:
                self._send(protocol.Rejected(rid, f"constraint: {e}"))
                continue
            except Exception as e:  # the tokenizer failed to build, or llguidance failed
                log.error("constraint of request %d failed to compile: %s", rid, e)
                self._send(protocol.Rejected(rid, f"constraint: {type(e).__name__}: {e}"))
                continue
            if self._admit(req):
                self.grammars.add(rid, matcher)

    def _admit(self, req: GenerateRequest) -> bool:
        stop_ids = list(req.stop_token_ids)
        if not req.ignore_eos:
            stop_ids += self.runner.eos_token_ids
        try:  # first: a penalized request's token statistics take device memory
            self.sampler.add(req, stop_ids)
        except (torch.OutOfMemoryError, MemoryError):
            self.sampler.remove(req.rid)
            self._send(protocol.Rejected(req.rid, "no device memory left for its repetition / "
                                         "presence / frequency penalties' token statistics"))
            return False
        try:
            self.scheduler.submit(req.rid, np.asarray(req.prompt_ids, dtype=np.int32),
                                  req.max_new_tokens, np.asarray(stop_ids, dtype=np.int32),
                                  req.session)
        except (ValueError, TypeError, OverflowError) as e:  # the binding's conversions raise the last two
            self.sampler.remove(req.rid)
            self._send(protocol.Rejected(req.rid, str(e)))
            return False
        self.requests[req.rid] = req
        self._unadmitted.add(req.rid)
        if self.speculator is not None:
            self.speculator.start(req)
        return True

    def _check_request(self, req: GenerateRequest) -> None:
        """ValueError unless the ids and counts fit the scheduler's int32 / int64 arguments."""
        vocab = self.runner.vocab_size
        if not INT64_MIN <= req.rid <= INT64_MAX:
            raise ValueError(f"request id {req.rid} does not fit in a signed 64-bit integer")
        if req.rid in self.requests or req.rid in self.compiling:
            raise ValueError(f"request id {req.rid} is already running")
        if not 1 <= req.max_new_tokens <= INT32_MAX:
            raise ValueError(f"max_new_tokens must be in [1, {INT32_MAX}], got {req.max_new_tokens}")
        for name, ids in (("prompt", req.prompt_ids), ("stop", req.stop_token_ids)):
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"{name} token ids must be in [0, {vocab})")
        check_sampling(req)
        check_logits_processors(req, vocab)
        check_logprobs(req)
        if req.constraint is not None:
            check_constraint(req.constraint)
            if req.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with a constraint: a finished "
                                 "grammar allows only the end of sequence")

    def _abort(self, rid: int) -> None:
        compiling = self.compiling.pop(rid, None)
        if compiling is not None:
            compiling[1].cancel()  # a compile already under way finishes; its matcher is dropped
        elif self.requests.pop(rid, None) is not None:
            self.scheduler.abort(rid)
            self._forget(rid)
        else:
            return
        self._publish_stats(force=True)
        self._send(protocol.Outputs([TokenOutput(rid, -1, "abort")]))

    def _forget(self, rid: int) -> None:
        self.sampler.remove(rid)
        self.grammars.remove(rid)
        self._unadmitted.discard(rid)
        self._cached_tokens.pop(rid, None)
        if self.speculator is not None:
            self.speculator.finish(rid)

    def _emit(self, events: list[tuple[int, int, str]],
              logprobs: dict[int, list[protocol.TokenLogprobs]]) -> dict[int, list[int]]:
        """Queue the commit's tokens for `_send_outputs`; returns them per request that was
        running, in order. `logprobs`: per request, those of its tokens in order (a verify
        row's emitted tokens are its first logits rows)."""
        items = self._unsent
        emitted: dict[int, list[int]] = {}
        requests, grammars = self.requests, self.grammars if self.grammars else None
        for rid, token, reason in events:
            if rid not in requests:
                continue
            if grammars is not None and not reason and (error := grammars.advance(rid, token)):
                self._fail(rid, f"its grammar refused the token sampled under its own mask "
                                f"({error.splitlines()[0] if error else 'no reason given'})")
                continue
            cached = self._cached_tokens.pop(rid, None) if self._cached_tokens else None
            lps = logprobs.get(rid)
            items.append(TokenOutput(rid, token, reason or None, lps.pop(0) if lps else None,
                                     cached))
            emitted.setdefault(rid, []).append(token)
            if reason:
                self._end(rid)
        return emitted

    def _end(self, rid: int) -> None:
        """Running request `rid` ended in the outputs being queued: forget it (the stats go
        out before those outputs)."""
        del self.requests[rid]
        self._forget(rid)
        self._unsent_finished = True

    def _fail(self, rid: int, why: str) -> None:
        """End running request `rid` on an engine-side error: its reply becomes an error that
        says `why` (sent after the outputs queued before it), never a normal end."""
        log.error("request %d: %s", rid, why)
        self.scheduler.abort(rid)
        self._end(rid)
        self._unsent_failed.append(protocol.Rejected(rid, why))

    def _send_outputs(self) -> None:
        """Send the queued outputs (stats first when a request ended in them, so that /metrics
        and /stats are current when its reply ends, and again after the next commit, which
        frees what the step in flight held of it), then the failures."""
        if self._unsent_finished or self._stats_after_next_commit:
            self._stats_after_next_commit = self._unsent_finished
            self._unsent_finished = False
            self._publish_stats(force=True)
        if self._unsent:
            self._send(protocol.Outputs(self._unsent))
            self._unsent = []
        for failed in self._unsent_failed:
            self._send(failed)
        self._unsent_failed = []

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < STATS_PERIOD_S:
            return
        self._last_stats = now
        values = {k: float(v) for k, v in self.scheduler.stats().items()}
        values["page_size"] = float(self.runner.page_size)
        values.update(self.step_error.stats())
        values.update(self.late_compiles.stats())
        if self.speculator is not None:
            values["spec_gate_paused_steps"] = float(self.speculator.gate.paused)
        progress = [protocol.RequestProgress(*row) for row in self.scheduler.progress()]
        self._send(protocol.Stats(values, progress))

    def _send(self, message) -> None:
        self._outbox.send(protocol.encode(message))


def gpu_uuids(device: torch.device, tp_size: int) -> list[str]:
    """The GPUs of ranks 0..tp_size-1 as NVML names them ("GPU-<uuid>"), so the frontend reads
    the right ones whatever CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER say; [] on CPU."""
    if device.type != "cuda":
        return []
    return [f"GPU-{torch.cuda.get_device_properties(rank).uuid}" for rank in range(tp_size)]


def to_forward_batch(arrays: PlanArrays, device: torch.device,
                     prev_tokens: torch.Tensor | None = None,
                     logit_index: np.ndarray | None = None):
    """The plan's arrays as the model runner's ForwardBatch on `device` (one copy). Placeholder
    input ids -(r+1) become the token row r of the previous step sampled: looked up in
    `prev_tokens` on rank 0, then broadcast over the TP group (a stream-ordered device
    collective: no host sync), so every rank runs the same ids. `logit_index` (steps with
    verify rows, `LogitLayout.index`): the tokens that need logits."""
    from appliance.model import ForwardBatch

    names = ("input_ids", "positions", "query_start", "prefix_lens", "seq_lens", "slot_mapping")
    parts = [getattr(arrays, n) for n in names] + [arrays.page_table.ravel()]
    if logit_index is not None:
        parts.append(logit_index)
    flat = to_device(torch.from_numpy(np.concatenate(parts)), device)   # [sum of sizes] int32
    views = dict(zip(names + ("page_table", "logit_index"), flat.split([len(p) for p in parts])))
    input_ids = views["input_ids"]                                       # [T]
    if arrays.input_ids.min(initial=0) < 0:
        if prev_tokens is not None:
            input_ids = resolve_placeholders(input_ids, arrays.input_ids, prev_tokens)
        if dist.is_initialized() and dist.get_world_size() > 1:
            input_ids = input_ids.contiguous()
            dist.broadcast(input_ids, 0)
    return ForwardBatch(
        input_ids=input_ids, positions=views["positions"], query_start=views["query_start"],
        prefix_lens=views["prefix_lens"], seq_lens=views["seq_lens"],
        page_table=views["page_table"].view(arrays.page_table.shape),
        slot_mapping=views["slot_mapping"], num_decode=arrays.num_decode,
        extend_keys_host=int(arrays.seq_lens[arrays.num_decode:].sum()),
        logit_index=views.get("logit_index"))


def resolve_placeholders(input_ids: torch.Tensor, host_ids: np.ndarray,
                         prev_tokens: torch.Tensor) -> torch.Tensor:
    """input_ids [T] on the device with each placeholder -(r+1) replaced by prev_tokens[r]
    (host_ids: the same ids on the host). When token t is placeholder -(t+1) for every t
    (decode rows that kept their order: most decode steps), prev_tokens' first T rows as
    they are, without a launch."""
    t = host_ids.size
    if t <= len(prev_tokens) and (host_ids == -np.arange(1, t + 1, dtype=host_ids.dtype)).all():
        return prev_tokens[:t]
    rows = (-input_ids - 1).clamp(min=0).long()
    return torch.where(input_ids < 0, prev_tokens[rows], input_ids)


def run_worker(runner, channel: PlanChannel, mtp: bool = False) -> None:
    """Ranks > 0: run every plan rank 0 broadcasts (verify rows included), until it says
    stop; with `mtp`, the MTP pass after each step too (its inputs come from rank 0)."""
    next_token = NextTokenPass(runner, channel.group) if mtp else None
    while (arrays := channel.receive()) is not None:
        index = LogitLayout.of(arrays).index if arrays.has_drafts else None
        batch = to_forward_batch(arrays, runner.device, logit_index=index)
        if next_token is None:
            runner.forward(batch)
        else:
            next_token.follow(batch, runner.forward_hidden(batch)[1], arrays)
