"""The SPMD modeling layer: placements, the placement compiler, layers, models, loading.

See README.md for the package map. Imports torch, kernels, safetensors, tokenizers (and
transformers only in tests); never appliance.engine or appliance.server.
"""
from appliance.model.batch import ForwardBatch
from appliance.model.runner import ModelRunner, ModelSource

__all__ = ["ForwardBatch", "ModelRunner", "ModelSource"]
