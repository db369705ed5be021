"""Speculative decoding: draft sources behind `DraftSource`, the per-request draft policy and
the `Speculator` the engine loop calls. The verifier is appliance/engine/verify.py."""

from __future__ import annotations

from appliance.config import SpeculativeConfig
from appliance.engine.speculative.ngram import NgramDraft
from appliance.engine.speculative.speculator import Speculator


def make_speculator(config: SpeculativeConfig) -> Speculator | None:
    """The configured draft source behind a Speculator; None when speculation is off.
    (appliance/config.py refuses the methods this build does not have.)"""
    if config.method == "off":
        return None
    sources = {"ngram": NgramDraft}
    return Speculator(sources[config.method](), config.max_draft)
