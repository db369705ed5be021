"""The SPMD modeling layer: placements, the placement compiler, layers, models, loading.

See README.md for the package map. Imports torch, kernels, safetensors, tokenizers (and
transformers only in tests); never appliance.engine or appliance.server. The package itself
imports nothing until a name is asked for: the frontend reads presets and model files
without torch (seconds of import, off the start-up's path before the ranks spawn).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.model.batch import ForwardBatch
    from appliance.model.runner import ModelRunner, ModelSource

_HOMES = {"ForwardBatch": "appliance.model.batch", "ModelRunner": "appliance.model.runner",
          "ModelSource": "appliance.model.runner"}
__all__ = ["ForwardBatch", "ModelRunner", "ModelSource"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'appliance.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
