"""Per-layer scales of an FP8 KV cache, read from the checkpoint when it carries them.

An FP8 cache holds K / k_scale and V / v_scale (kernels/reference/kv_cache.py); without
calibration both are 1.0. Calibrated checkpoints store one float32 scalar per attention layer,
next to its projections, in one of two spellings:
- llm-compressor (compressed-tensors): `<attn>.k_scale`, `<attn>.v_scale`;
- NVIDIA ModelOpt: `<attn>.k_proj.k_scale`, `<attn>.v_proj.v_scale`,
where `<attn>` is the HF attention module (`model.layers.N.self_attn`), the parent of our
`PagedAttention` (`...self_attn.attn`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from appliance.model.hf_checkpoint import checkpoint_files
from appliance.model.loader import LoadError


def scale_names(attn: str) -> dict[str, tuple[str, str]]:
    """The checkpoint names a layer's k and v scales may have (`attn`: the HF attention
    module's path)."""
    return {"k": (f"{attn}.k_scale", f"{attn}.k_proj.k_scale"),
            "v": (f"{attn}.v_scale", f"{attn}.v_proj.v_scale")}


def apply_checkpoint_kv_scales(model: nn.Module, folder: str | Path,
                               names: frozenset[str]) -> int:
    """Give every KV layer (a module with `set_kv_scales`) the scales the checkpoint holds for
    it; returns how many layers got them. A layer with only one of the two, or a scale that is
    not one positive finite number, is a LoadError naming the tensor."""
    found: dict[nn.Module, dict[str, str]] = {}
    for path, module in model.named_modules():
        if not hasattr(module, "set_kv_scales"):
            continue
        attn = path.rsplit(".", 1)[0]
        have = {kind: next((n for n in options if n in names), None)
                for kind, options in scale_names(attn).items()}
        if have["k"] is None and have["v"] is None:
            continue
        if have["k"] is None or have["v"] is None:
            present = have["k"] or have["v"]
            raise LoadError(f"{folder}: {present} has no {'v' if have['v'] is None else 'k'} "
                            "scale beside it (an FP8 KV cache needs both or neither)")
        found[module] = have
    values = _read_scalars(folder, {n for have in found.values() for n in have.values()})
    for module, have in found.items():
        module.set_kv_scales(values[have["k"]], values[have["v"]])
    return len(found)


def _read_scalars(folder: str | Path, wanted: set[str]) -> dict[str, float]:
    """The named one-element tensors of a safetensors checkpoint, as checked floats."""
    if not wanted:
        return {}
    files, _ = checkpoint_files(folder)
    out: dict[str, float] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in wanted.intersection(f.keys()):
                tensor = f.get_tensor(name)
                value = float(tensor.to(torch.float32).reshape(-1)[0]) if tensor.numel() == 1 \
                    else math.nan
                if not (math.isfinite(value) and value > 0):
                    raise LoadError(f"{file.name}: {name} must be one positive finite number "
                                    f"(an FP8 KV-cache scale), got shape {tuple(tensor.shape)}: "
                                    f"{tensor.flatten()[:4].tolist()}")
                out[name] = value
    return out
