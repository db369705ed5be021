"""GGUF metadata -> the HF config dict our model classes read (llama, qwen2, qwen3).

GGUF keeps the shape under `<arch>.*` keys (`llama.embedding_length` is HF's hidden_size);
the vocabulary size comes from the embedding tensor, tied embeddings from the absence of an
`output.weight` tensor, and a Llama-3.1-style rope from the `rope_freqs` tensor llama.cpp
writes instead of HF's `rope_scaling` (recovered only when it matches the llama3 formula).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from appliance.model.load_error import LoadError

# GGUF general.architecture -> (HF architecture, HF model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


def gguf_hf_config(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                   rope_freqs: np.ndarray | None, source: str) -> dict[str, Any]:
    """`fields`: the GGUFReader's fields; `shapes`: GGUF tensor name -> torch shape."""
    meta = _Metadata(fields, source)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise LoadError(f"{source}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    hf_arch, model_type = ARCHITECTURES[arch]
    if "token_embd.weight" not in shapes:
        raise LoadError(f"{source}: no token_embd.weight tensor")
    hidden = meta.uniform(f"{arch}.embedding_length")
    heads = meta.uniform(f"{arch}.attention.head_count")
    head_dim = meta.uniform(f"{arch}.attention.key_length", hidden // heads)
    if meta.uniform(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise LoadError(f"{source}: attention.value_length differs from key_length")
    if meta.uniform(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise LoadError(f"{source}: {arch}.rope.dimension_count differs from the head size "
                        "(partial rotary is not supported for GGUF)")
    cfg: dict[str, Any] = {
        "architectures": [hf_arch], "model_type": model_type,
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": meta.uniform(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.uniform(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.uniform(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": meta.uniform(f"{arch}.context_length", 4096),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes and model_type != "qwen2",
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    scaling = _rope_scaling(meta, arch, rope_freqs, cfg, source)
    if scaling:
        cfg["rope_scaling"] = scaling
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        if (value := meta.get(f"tokenizer.ggml.{key}", None)) is not None:
            cfg[hf_key] = int(value)
    eos = [int(meta.get(f"tokenizer.ggml.{key}", -1))
           for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    cfg["eos_token_id"] = sorted({e for e in eos if e >= 0})
    return cfg


class _Metadata:
    """Typed access to GGUF key/values, with errors that name the file and the key."""

    def __init__(self, fields: dict[str, Any], source: str) -> None:
        self.fields, self.source = fields, source

    def get(self, key: str, default: Any = ...) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise LoadError(f"{self.source}: GGUF metadata lacks {key}")
            return default
        return field.contents()

    def uniform(self, key: str, default: Any = ...) -> int:
        """An int that GGUF may also store per layer (then every layer must agree)."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise LoadError(f"{self.source}: {key} differs between layers ({value}); "
                                "TokenSpeed serves models whose layers share one shape")
            value = value[0]
        return int(value)


def _rope_scaling(meta: _Metadata, arch: str, rope_freqs: np.ndarray | None,
                  cfg: dict[str, Any], source: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if rope_freqs is not None:
        return _llama3_scaling(rope_freqs, cfg, source)
    if kind == "none":
        return None
    factor = float(meta.get(f"{arch}.rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = meta.uniform(f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": original}
    raise LoadError(f"{source}: {arch}.rope.scaling.type {kind!r} is not supported "
                    "(none, linear, yarn, or llama3 through rope_freqs)")


def _llama3_scaling(rope_freqs: np.ndarray, cfg: dict[str, Any],
                    source: str) -> dict[str, Any]:
    """llama.cpp stores Llama-3.1's rope as per-frequency divisors; HF as four numbers.
    Take the factor from the divisors, the published defaults for the rest, and accept them
    only if they reproduce every divisor."""
    # torch only here: the frontend reads GGUF configs without it, and rope_freqs is Llama-3's
    import torch

    from appliance.model.layers.rotary import RopeConfig, inv_frequencies

    scaling = {"rope_type": "llama3", "factor": float(np.max(rope_freqs)), **_LLAMA3_DEFAULTS}
    dim = int(cfg["head_dim"])
    theta = float(cfg["rope_theta"])
    plain = inv_frequencies(RopeConfig(theta=theta), dim)
    scaled = inv_frequencies(RopeConfig(theta=theta, rope_type="llama3", factor=scaling["factor"],
                                        **_LLAMA3_DEFAULTS), dim)
    divisors = torch.from_numpy(np.asarray(rope_freqs, dtype=np.float32)).flatten()
    if divisors.shape != plain.shape or not torch.allclose(plain / scaled, divisors, rtol=1e-3):
        raise LoadError(f"{source}: its rope_freqs tensor is not Llama-3 rope scaling with "
                        f"low_freq_factor 1, high_freq_factor 4, original length 8192; "
                        "TokenSpeed cannot read this rope from GGUF (serve the HF folder)")
    return scaling
