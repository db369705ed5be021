"""GGUF checkpoints: one `.gguf` file -> this rank's slices of the HF-named parameters.

`load_gguf` fills the compiler's ShardPlan like `loader.load_checkpoint` does for safetensors:
GGUF tensor names are mapped to HF names (gguf_files.py: `hf_tensor_name`), each tensor is
dequantized with `gguf.quants` (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1 and the K-quants) to
float32 and cast into the parameter's dtype.
Quantized rows are blocks along the last (input) dimension, so a shard along any other
dimension dequantizes only this rank's rows; a shard along the last one dequantizes the
whole tensor and narrows it. llama.cpp stores Llama's q/k projection rows permuted for its
interleaved rope (`_unpermute_heads` undoes it); Qwen2/Qwen3 use the half-split rope and
are stored as HF has them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import ReaderTensor
from torch import nn

from appliance.model.gguf_files import (MappedTensor, dequantize_array, dequantize_tensor,
                                        gguf_tensors, hf_tensor_name, read_gguf_config,
                                        tensor_shape)
from appliance.model.loader import LoadError, destination, missing_names, zero_parameters
from appliance.model.placement import LoadSlice, ShardPlan


def load_gguf(model: nn.Module, plan: ShardPlan, path: str | Path,
              prepared: str | Path | None = None) -> None:
    """`prepared`: the file's folder of parsed metadata (gguf_files.py), read if given."""
    config = read_gguf_config(path, prepared)
    by_hf_name = {hf: t for t in gguf_tensors(path, prepared)
                  if (hf := hf_tensor_name(t.name)) is not None}
    absent = [n for n in plan.slices if n not in by_hf_name]
    if absent:
        raise LoadError(f"{path}: checkpoint lacks tensor(s) {missing_names(absent)}")
    unpermute = _llama_qk_heads(config)
    params = dict(model.named_parameters())
    zero_parameters(model)
    for name, slices in plan.slices.items():
        tensor = by_hf_name[name]
        shape = tensor_shape(tensor)
        for s in slices:
            if shape != s.shape:
                raise LoadError(f"{Path(path).name}: tensor {tensor.name} ({name}) has shape "
                                f"{shape}, the model expects {s.shape} (for parameter {s.param})")
            heads = next((h for suffix, h in unpermute.items() if name.endswith(suffix)), None)
            part = _read_slice(tensor, s, heads)
            destination(params, s).copy_(part)                  # to device and dtype


def _read_slice(tensor: ReaderTensor | MappedTensor, s: LoadSlice,
                permuted_heads: int | None) -> torch.Tensor:
    """This rank's part of `tensor` as float32: only its rows when it is sharded along
    a dimension other than the quantized (last) one."""
    if s.src_dim is not None and s.src_dim < len(s.shape) - 1 and permuted_heads is None:
        rows = (slice(None),) * s.src_dim + (slice(s.src_start, s.src_start + s.length),)
        return torch.from_numpy(dequantize_array(tensor.data[rows], tensor.tensor_type))
    value = torch.from_numpy(dequantize_tensor(tensor))
    if permuted_heads is not None:
        value = _unpermute_heads(value, permuted_heads)
    return value if s.src_dim is None else value.narrow(s.src_dim, s.src_start, s.length)


def _llama_qk_heads(hf_config: dict) -> dict[str, int]:
    """HF name suffix -> head count of the q/k tensors llama.cpp permuted (Llama only)."""
    if hf_config.get("model_type") != "llama":
        return {}
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    return {"q_proj.weight": heads, "q_proj.bias": heads,
            "k_proj.weight": kv_heads, "k_proj.bias": kv_heads}


def _unpermute_heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order within each head: it stores the rope pairs (i, i + D/2)
    next to each other (interleaved), HF keeps the two halves apart."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
