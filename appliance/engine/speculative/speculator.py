"""The step loop's side of speculative decoding: one object the engine calls.

After each commit the accepted tokens go to the draft source and every decoding request that
takes part gets a fresh proposal, sized by the `DraftPolicy`; before the next plan the
proposals go to the scheduler (`set_drafts`), which plans them as verify rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from appliance.engine.protocol import GenerateRequest
from appliance.engine.speculative.draft import DraftSource
from appliance.engine.speculative.policy import BatchGate, DraftPolicy, StepCost


class Speculator:
    def __init__(self, source: DraftSource, max_draft: int) -> None:
        self.source = source
        self.policy = DraftPolicy(max_draft)
        self.gate = BatchGate()
        self._tracked: set[int] = set()  # requests that take part (not opted out)
        self._decoding: set[int] = set()  # ... and have emitted a token (drafts follow it)
        self._proposals: dict[int, list[int]] = {}

    def start(self, req: GenerateRequest) -> None:
        if not takes_part(req):
            return
        self.source.start(req.rid, req.prompt_ids, req.session)
        self.policy.add(req.rid)
        self._tracked.add(req.rid)

    def finish(self, rid: int) -> None:
        if rid not in self._tracked:
            return
        self._tracked.discard(rid)
        self._decoding.discard(rid)
        self._proposals.pop(rid, None)
        self.policy.remove(rid)
        self.source.finish(rid)

    def committed(self, emitted: dict[int, list[int]], verified: list[tuple[int, int, int]],
                  rows: int, step_time_s: float) -> None:
        """A commit's tokens per request (in order), its verify rows as (rid, drafted,
        accepted), its number of rows and its measured time."""
        for rid, tokens in emitted.items():
            if rid in self._tracked:
                self.source.extend(rid, tokens)
                self._decoding.add(rid)
        for rid, drafted, accepted in verified:
            self.policy.record(rid, drafted, accepted)
        if len(emitted) == rows:  # a decode step (a prefill chunk would skew its rate)
            self.gate.record(bool(verified), sum(map(len, emitted.values())), step_time_s)

    def propose(self, cost: StepCost,
                allowed: Callable[[int, list[int]], int] | None = None) -> bool:
        """Fresh proposals for the decoding requests from their contexts as committed so far,
        cut to the first `allowed(rid, drafts)` (a grammar's verdict); True when any request
        has drafts (the next step should verify)."""
        self._proposals = {}
        if not self.gate.open:
            for rid in self._decoding:
                self.policy.idle(rid)
            return False
        for rid, k in self.policy.lengths(sorted(self._decoding), cost).items():
            drafts = self.source.propose(rid, k) if k > 0 else []
            if drafts and allowed is not None:
                drafts = drafts[:allowed(rid, drafts)]
            if drafts:
                self._proposals[rid] = drafts
            else:
                self.policy.idle(rid)
        return bool(self._proposals)

    def hand_to(self, scheduler) -> None:
        """The proposals, as the scheduler's drafts for the next plan."""
        for rid, drafts in self._proposals.items():
            scheduler.set_drafts(rid, np.asarray(drafts, dtype=np.int32))
        self._proposals = {}


def takes_part(req: GenerateRequest) -> bool:
    """Whether `req` gets drafts: unless it opted out. Every sampling feature composes, since
    each logits row of a chain is sampled as a plain decode at its position would be
    (`LogitLayout.per_logit_row`): logit_bias is stateless, min_tokens holds the stop ids
    back by the row's own position, penalties count the drafts before the row
    (`LogitsProcessors.plan`), an emitted token's log-probabilities are its own row's; and a
    grammar's masks follow the drafts, min_tokens folded in (verify.verify_bitmask)."""
    return req.speculative
