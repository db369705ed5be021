"""GGUF files, read without torch: which file `model.path` names, its HF-style config, its
tensor names in HF terms and their shapes, and dequantization to numpy.

`find_gguf(path)` says whether `model.path` names a GGUF checkpoint (the file, or a folder
holding exactly one and no config.json); `read_gguf_config` gives its config
(gguf_config.py) and refuses tensor types TokenSpeed does not read. The frontend calls these
before it spawns the engine ranks, so nothing here imports torch (seconds of start-up);
gguf_checkpoint.py loads the weights.

Parsing a file's metadata builds a numpy view for every token of its vocabulary (5 s for
SmolLM2's 49K tokens on a 2-core box, half of the default model's start-up). So the frontend
parses it once, into the folder it prepares beside the tokenizer (gguf_tokenizer.py): the config
(`GGUF_CONFIG`) and where each tensor lies in the file (`TENSOR_INDEX`, `write_tensor_index`).
An engine rank handed that folder (`prepared`) reads those and maps the tensors' bytes.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from appliance.model.gguf_config import gguf_hf_config
from appliance.model.load_error import LoadError, check_regular_file

Q = GGMLQuantizationType
TORCH_DEQUANTIZED = (Q.Q8_0, Q.Q4_0, Q.Q4_1)   # by gguf_blocks.py; the others by gguf.quants
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

GGUF_CONFIG = "gguf_config.json"     # not config.json: transformers would read that one
TENSOR_INDEX = "gguf_tensors.json"
# generation_config.json's sampling fields -> the keys llama.cpp's converter writes them under.
# Not read: general.sampling.penalty_repeat, which penalizes the last penalty_last_n tokens
# (HF's repetition_penalty, what the engine applies, penalizes the whole context).
SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p",
                 "top_k": "general.sampling.top_k"}


@dataclass(frozen=True)
class MappedTensor:
    """A tensor of the file as ReaderTensor has it (the fields gguf_checkpoint.py reads): its
    GGUF name and type, its shape innermost first, and its raw data mapped from the file."""
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


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
    if files:
        check_regular_file(files[0])
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
    except Exception as e:  # a truncated or damaged file fails in the reader's numpy parsing
        size = path.stat().st_size if path.exists() else 0
        raise LoadError(f"{path}: not a readable GGUF file ({size:,} bytes: truncated or "
                        f"damaged?): {type(e).__name__}: {e}") from None
    split = reader.fields.get("split.count")
    if split is not None and int(split.contents()) > 1:
        raise LoadError(f"{path}: a split GGUF checkpoint ({int(split.contents())} files); "
                        "merge it into one file (llama-gguf-split --merge)")
    return reader


def gguf_tensors(path: str | Path, prepared: str | Path | None = None
                 ) -> list[ReaderTensor] | list[MappedTensor]:
    """The file's tensors: mapped through `prepared`'s tensor index when it has one, else
    from its parsed metadata."""
    index = Path(prepared) / TENSOR_INDEX if prepared is not None else None
    if index is None or not index.is_file():
        return open_gguf(path).tensors
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = []
    for t in json.loads(index.read_text()):
        dtype = np.dtype(t["dtype"])
        size = int(np.prod(t["data_shape"])) * dtype.itemsize
        data = mapped[t["offset"]: t["offset"] + size].view(dtype).reshape(t["data_shape"])
        tensors.append(MappedTensor(t["name"], GGMLQuantizationType(t["type"]),
                                    tuple(t["shape"]), data))
    return tensors


def write_tensor_index(path: str | Path, out: Path) -> None:
    """`out`/TENSOR_INDEX: each tensor's name, type, shape, and its data's offset, numpy
    dtype and shape in the file (what `gguf_tensors` maps)."""
    index = [{"name": t.name, "type": int(t.tensor_type), "shape": [int(d) for d in t.shape],
              "offset": int(t.data_offset), "dtype": t.data.dtype.str,
              "data_shape": [int(d) for d in t.data.shape]} for t in open_gguf(path).tensors]
    (out / TENSOR_INDEX).write_text(json.dumps(index))


def read_gguf_config(path: str | Path, prepared: str | Path | None = None) -> dict:
    """The HF-style config dict of a GGUF file (appliance/model/gguf_config.py); LoadError
    for an architecture or a tensor type TokenSpeed does not read. From `prepared`'s copy
    when it has one (written once the file passed these checks)."""
    if prepared is not None and (Path(prepared) / GGUF_CONFIG).is_file():
        return json.loads((Path(prepared) / GGUF_CONFIG).read_text())
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


def read_gguf_sampling(path: str | Path) -> dict[str, object]:
    """The file's recommended sampling (`SAMPLING_KEYS`), by generation_config.json's names
    (sampling_defaults.py checks the values). A float32 value as its shortest decimal (0.6,
    not 0.6000000238): what its writer meant, and the same float32 in the engine."""
    reader = open_gguf(path)
    values = {name: reader.fields[key].contents() for name, key in SAMPLING_KEYS.items()
              if key in reader.fields}
    return {name: float(str(np.float32(v))) if isinstance(v, float) else v
            for name, v in values.items()}


def _hf_config(reader: GGUFReader, path: str | Path) -> dict:
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = tensors.get("rope_freqs.weight")
    return gguf_hf_config(reader.fields, {name: tensor_shape(t) for name, t in tensors.items()},
                          None if rope_freqs is None else dequantize_tensor(rope_freqs), str(path))


def tensor_shape(t: ReaderTensor | MappedTensor) -> tuple[int, ...]:
    """Its shape outermost first, as torch has it (GGUF lists dimensions innermost first)."""
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


def dequantize_tensor(tensor: ReaderTensor | MappedTensor) -> np.ndarray:
    return dequantize_array(tensor.data, tensor.tensor_type).reshape(tensor_shape(tensor))


def dequantize_array(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values of a tensor's data (a new array: the reader's are read-only views of
    the mapped file); the simple block formats by torch (gguf_blocks.py)."""
    if qtype in TORCH_DEQUANTIZED:
        from appliance.model.gguf_blocks import dequantize_blocks   # torch: a rank's import

        return dequantize_blocks(data, qtype)
    return np.array(dequantize(np.asarray(data), qtype), dtype=np.float32)
