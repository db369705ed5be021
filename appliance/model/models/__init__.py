"""Model registry: HF `architectures` name -> model class.

A model class is built as `cls(hf_config: dict, ctx: BuildContext)`, provides
`placement_chain()` and `forward(batch) -> logits`. Built-in architectures are imported
lazily from `_BUILTIN`; other code registers more with `@register_model("Name")`.
"""
from __future__ import annotations

import importlib
from typing import Callable

from appliance.model.load_error import LoadError

_REGISTRY: dict[str, type] = {}

# architecture -> module defining (and registering) it
_BUILTIN: dict[str, str] = {
    "LlamaForCausalLM": "appliance.model.models.llama",
    "MistralForCausalLM": "appliance.model.models.llama",
    "Qwen2ForCausalLM": "appliance.model.models.llama",
    "Qwen3ForCausalLM": "appliance.model.models.llama",
    "DeepseekV2ForCausalLM": "appliance.model.models.deepseek",
    "DeepseekV3ForCausalLM": "appliance.model.models.deepseek",
    "Qwen3MoeForCausalLM": "appliance.model.models.qwen3_moe",
    "Glm4MoeForCausalLM": "appliance.model.models.glm4_moe",
    "GptOssForCausalLM": "appliance.model.models.gpt_oss",
}


def register_model(*names: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        for name in names:
            _REGISTRY[name] = cls
        return cls
    return deco


def model_class(architectures: list[str] | None) -> type:
    """The class of the first supported name in an HF config's `architectures` (LoadError, a
    ValueError the rank reports in one line, if none is)."""
    for arch in architectures or []:
        if arch not in _REGISTRY and arch in _BUILTIN:
            try:
                importlib.import_module(_BUILTIN[arch])
            except ModuleNotFoundError as e:
                if e.name != _BUILTIN[arch]:
                    raise
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    known = sorted(set(_REGISTRY) | set(_BUILTIN))
    raise LoadError(f"unsupported architectures {architectures}; known: {known}")
