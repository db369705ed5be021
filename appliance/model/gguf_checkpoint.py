"""GGUF checkpoints: one `.gguf` file -> this rank's slices of the HF-named parameters.

`find_gguf(path)` says whether `model.path` names a GGUF checkpoint (the file, or a folder
holding exactly one and no config.json). `load_gguf` fills the compiler's ShardPlan like
`loader.load_checkpoint` does for safetensors: GGUF tensor names are mapped to HF names
(`hf_tensor_name`), each tensor is dequantized with `gguf.quants` (F32, F16, BF16, Q8_0,
Q4_0/1, Q5_0/1 and the K-quants) to float32 and cast into the parameter's dtype.
Quantized rows are blocks along the last (input) dimension, so a shard along any other
dimension dequantizes only this rank's rows; a shard along the last one dequantizes the
whole tensor and narrows it. llama.cpp stores Llama's q/k projection rows permuted for its
interleaved rope (`_unpermute_heads` undoes it); Qwen2/Qwen3 use the half-split rope and
are stored as HF has them.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from torch import nn

from appliance.model.gguf_config import gguf_hf_config
from appliance.model.loader import LoadError, destination, missing_names, zero_parameters
from appliance.model.placement import LoadSlice, ShardPlan

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names (the file itself, or the only *.gguf of a folder without
    config.json); None for anything else (an HF folder)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise LoadError(f"{path}: holds several GGUF files ({', '.join(f.name for f in files)}); "
                        "name the one to serve in model.path")
    return files[0] if files else None


def open_gguf(path: str | Path) -> GGUFReader:
    path = Path(path).resolve()
    return _open(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open(path: Path, mtime_ns: int) -> GGUFReader:
    # cached: parsing the metadata (the vocabulary) takes a second or two, and a start reads
    # the config, then the weights
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: not a readable GGUF file: {e}") from None
    split = reader.fields.get("split.count")
    if split is not None and int(split.contents()) > 1:
        raise LoadError(f"{path}: a split GGUF checkpoint ({int(split.contents())} files); "
                        "merge it into one file (llama-gguf-split --merge)")
    return reader


def read_gguf_config(path: str | Path) -> dict:
    """The HF-style config dict of a GGUF file (appliance/model/gguf_config.py); LoadError
    for an architecture or a tensor type TokenSpeed does not read."""
    reader = open_gguf(path)
    config = _hf_config(reader, path)
    unsupported: dict[str, str] = {}          # type -> its first tensor
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES and hf_tensor_name(t.name):
            unsupported.setdefault(t.tensor_type.name, t.name)
    if unsupported:
        found = ", ".join(f"{kind} (e.g. {name})" for kind, name in unsupported.items())
        raise LoadError(f"{path}: GGUF tensor type(s) TokenSpeed does not read: {found}; it "
                        f"reads {', '.join(t.name for t in SUPPORTED_TYPES)}")
    return config


def _hf_config(reader: GGUFReader, path: str | Path) -> dict:
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = tensors.get("rope_freqs.weight")
    return gguf_hf_config(reader.fields, {name: torch_shape(t) for name, t in tensors.items()},
                          None if rope_freqs is None else _dequantize(rope_freqs), str(path))


def torch_shape(t: ReaderTensor) -> tuple[int, ...]:
    """GGUF lists dimensions innermost first; torch outermost first."""
    return tuple(int(d) for d in reversed(t.shape))


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    m = _LAYER.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def load_gguf(model: nn.Module, plan: ShardPlan, path: str | Path) -> None:
    config = read_gguf_config(path)
    reader = open_gguf(path)
    by_hf_name = {hf: t for t in reader.tensors if (hf := hf_tensor_name(t.name)) is not None}
    absent = [n for n in plan.slices if n not in by_hf_name]
    if absent:
        raise LoadError(f"{path}: checkpoint lacks tensor(s) {missing_names(absent)}")
    unpermute = _llama_qk_heads(config)
    params = dict(model.named_parameters())
    zero_parameters(model)
    for name, slices in plan.slices.items():
        tensor = by_hf_name[name]
        shape = torch_shape(tensor)
        for s in slices:
            if shape != s.shape:
                raise LoadError(f"{Path(path).name}: tensor {tensor.name} ({name}) has shape "
                                f"{shape}, the model expects {s.shape} (for parameter {s.param})")
            heads = next((h for suffix, h in unpermute.items() if name.endswith(suffix)), None)
            part = _read_slice(tensor, s, heads)
            destination(params, s).copy_(part)                  # to device and dtype


def _read_slice(tensor: ReaderTensor, s: LoadSlice, permuted_heads: int | None) -> torch.Tensor:
    """This rank's part of `tensor` as float32: only its rows when it is sharded along
    a dimension other than the quantized (last) one."""
    if s.src_dim is not None and s.src_dim < len(s.shape) - 1 and permuted_heads is None:
        rows = (slice(None),) * s.src_dim + (slice(s.src_start, s.src_start + s.length),)
        return torch.from_numpy(_dequantize_array(tensor.data[rows], tensor.tensor_type))
    value = torch.from_numpy(_dequantize(tensor))
    if permuted_heads is not None:
        value = _unpermute_heads(value, permuted_heads)
    return value if s.src_dim is None else value.narrow(s.src_dim, s.src_start, s.length)


def _dequantize(tensor: ReaderTensor) -> np.ndarray:
    return _dequantize_array(tensor.data, tensor.tensor_type).reshape(torch_shape(tensor))


def _dequantize_array(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    # a copy: the reader's arrays are read-only views of the mapped file
    return np.array(dequantize(np.asarray(data), qtype), dtype=np.float32)


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
