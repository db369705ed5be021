"""Speculative decoding: draft sources behind `DraftSource`, the per-request draft policy and
the `Speculator` the engine loop calls. The verifier is appliance/engine/verify.py."""

from __future__ import annotations

from collections.abc import Callable

from appliance.config import SpeculativeConfig
from appliance.engine.speculative.draft import DraftSource
from appliance.engine.speculative.ngram import NgramDraft
from appliance.engine.speculative.speculator import Speculator
from appliance.engine.speculative.suffix import SuffixDraft

# `speculative.method` -> its draft source (appliance/config.py refuses the methods this build
# does not have)
DRAFT_SOURCES: dict[str, Callable[[], DraftSource]] = {"ngram": NgramDraft, "suffix": SuffixDraft}


def make_speculator(config: SpeculativeConfig) -> Speculator | None:
    """The configured draft source behind a Speculator; None when speculation is off."""
    if config.method == "off":
        return None
    return Speculator(DRAFT_SOURCES[config.method](), config.max_draft)
