"""Speculative decoding: draft sources behind `DraftSource`, the per-request draft policy and
the `Speculator` the engine loop calls. The verifier is appliance/engine/verify.py."""

from __future__ import annotations

from collections.abc import Callable

from appliance.config import SpeculativeConfig
from appliance.engine.speculative.draft import DraftSource
from appliance.engine.speculative.mtp import MTPDraft
from appliance.engine.speculative.ngram import NgramDraft
from appliance.engine.speculative.speculator import Speculator
from appliance.engine.speculative.suffix import SuffixDraft

# `speculative.method` -> its draft source, for the sources that read tokens only; "mtp"
# (MTPDraft) also needs the engine to run the model's next-token layer (speculative/mtp.py)
DRAFT_SOURCES: dict[str, Callable[[], DraftSource]] = {"ngram": NgramDraft, "suffix": SuffixDraft}


def make_speculator(config: SpeculativeConfig) -> Speculator | None:
    """The configured draft source behind a Speculator; None when speculation is off."""
    if config.method == "off":
        return None
    source = (MTPDraft(config.max_draft) if config.method == "mtp"
              else DRAFT_SOURCES[config.method]())
    return Speculator(source, config.max_draft)
