"""Weight loading: HF checkpoint folders or GGUF files onto this rank's shard, or seeded
dummy weights.

`read_hf_config` and `load_checkpoint` take an HF folder or a GGUF checkpoint (a `.gguf`
file, or a folder holding one: `gguf_files.find_gguf`), which gguf_checkpoint.py reads.
For an HF folder, `load_checkpoint` reads config.json + model.safetensors (or shards listed by
model.safetensors.index.json, or every *.safetensors) with safetensors, and for each tensor
of the compiler's ShardPlan reads only this rank's slice (`get_slice`, before anything
moves to the device), then copies it into the parameter. Checkpoint tensors no parameter
needs (rotary caches, a tied lm_head, MTP layers) are skipped. A tensor the plan needs but
the checkpoint lacks, or one whose shape differs, raises LoadError naming it; so do quantized
checkpoints (a `quantization_config`, or weights stored as FP8 / integers), which would
otherwise load as garbage: an FP8 weight cast to bf16 without its block scales. The one
quantized format read is MXFP4 (GPT-OSS's experts): uint8 `<name>_blocks` / `<name>_scales`
load as they are into uint8 parameters (experts kept packed), and a tensor the plan needs
that the checkpoint holds only as such a pair is dequantized to bf16 as it loads (mxfp4.py),
one expert at a time.
`load_dummy` fills the same plan with random values seeded per tensor name, so every rank
and every TP size sees the same full tensors.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import torch
from torch import nn

from appliance.model import mxfp4
from appliance.model.hf_checkpoint import (checkpoint_files, json_object, language_config,
                                           open_safetensors)
from appliance.model.load_error import LoadError
from appliance.model.placement import LoadSlice, ShardPlan
from kernels.mxfp4 import SCALE_BIAS


FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")     # safetensors dtype names we can cast from


def read_hf_config(folder: str | Path, prepared: str | Path | None = None) -> dict:
    """config.json of an HF folder, or the HF-style config of a GGUF checkpoint (`prepared`:
    its folder of parsed metadata, gguf_files.py)."""
    from appliance.model import gguf_files

    if (gguf := gguf_files.find_gguf(folder)) is not None:
        return gguf_files.read_gguf_config(gguf, prepared)
    path = Path(folder) / "config.json"
    if not path.exists():
        raise LoadError(f"{path}: not found (an HF checkpoint folder needs config.json)")
    cfg = language_config(json_object(path))
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
        if method != "mxfp4":   # MXFP4 experts: read packed, or dequantized at load
            raise LoadError(f"{path}: the checkpoint is quantized (quantization_config."
                            f"quant_method = {method!r}); TokenSpeed loads 16- and 32-bit float "
                            "weights only: use the model's bf16/fp16 release")
    return cfg


def read_eos_token_ids(folder: str | Path | None, hf_config: dict) -> list[int]:
    """eos ids from generation_config.json when present, else from config.json."""
    eos = None
    if folder is not None:
        gen = Path(folder) / "generation_config.json"
        if gen.is_file():
            eos = json_object(gen).get("eos_token_id")
    if eos is None:
        eos = hf_config.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def checkpoint_tensor_names(folder: str | Path, prepared: str | Path | None = None
                            ) -> frozenset[str]:
    """Every tensor name (HF spelling) of a checkpoint: a folder's index or files' headers, or
    a GGUF file's tensors (`prepared`: its folder of parsed metadata, gguf_files.py)."""
    from appliance.model import gguf_files

    if (gguf := gguf_files.find_gguf(folder)) is not None:
        return frozenset(hf for t in gguf_files.gguf_tensors(gguf, prepared)
                         if (hf := gguf_files.hf_tensor_name(t.name)) is not None)
    files, weight_map = checkpoint_files(folder)
    if weight_map is not None:
        return frozenset(weight_map)
    names: set[str] = set()
    for file in files:
        with open_safetensors(file, "pt", device="cpu") as f:
            names.update(f.keys())
    return frozenset(names)


def destination(params: dict[str, torch.Tensor], s: LoadSlice) -> torch.Tensor:
    dst = params[s.param]
    for i in s.index:
        dst = dst[i]
    if s.src_dim is not None:
        dst = dst.narrow(s.src_dim, s.dst_start, s.length)
    return dst


def zero_parameters(model: nn.Module) -> None:
    # vocab padding rows are never written by the plan: they must read as zeros
    for p in model.parameters():
        p.data.zero_()


def load_checkpoint(model: nn.Module, plan: ShardPlan, folder: str | Path,
                    prepared: str | Path | None = None) -> None:
    """`prepared`: a GGUF checkpoint's folder of parsed metadata (gguf_files.py)."""
    from appliance.model import gguf_checkpoint, gguf_files   # build on this module's helpers

    if (gguf := gguf_files.find_gguf(folder)) is not None:
        gguf_checkpoint.load_gguf(model, plan, gguf, prepared)
        return
    files, weight_map = checkpoint_files(folder)
    located = weight_map if weight_map is not None else _tensor_files(files)
    packed = {n for n in plan.slices if n not in located    # MXFP4 pairs to dequantize
              and all(p in located for p in mxfp4.packed_names(n))}
    if weight_map is not None:
        absent = [n for n in plan.slices if n not in weight_map and n not in packed]
        if absent:
            raise LoadError(f"{folder}: checkpoint lacks tensor(s) {missing_names(absent)} "
                            "(not in model.safetensors.index.json)")
    params = dict(model.named_parameters())
    zero_parameters(model)
    remaining = set(plan.slices)
    for file in files:
        with open_safetensors(file, "pt", device="cpu") as f:
            for name in f.keys():
                wanted = plan.slices.get(name)
                if not wanted:
                    continue
                view = f.get_slice(name)
                codes = all(params[s.param].dtype == torch.uint8 for s in wanted)  # MXFP4 kept
                if view.get_dtype() not in FLOAT_DTYPES and not (
                        codes and view.get_dtype() == "U8"):  # e.g. F8_E4M3 without scales
                    raise LoadError(f"{file.name}: tensor {name} is {view.get_dtype()}; "
                                    "TokenSpeed loads 16- and 32-bit float weights only (a "
                                    "quantized checkpoint? use the bf16/fp16 release)")
                _copy_slices(params, name, view, wanted, file.name)
                remaining.discard(name)
    for name in sorted(packed):
        _load_packed(params, name, plan.slices[name], Path(folder), located)
        remaining.discard(name)
    if remaining:
        raise LoadError(f"{folder}: checkpoint lacks tensor(s) {missing_names(sorted(remaining))}")


def check_finite(model: nn.Module) -> None:
    """LoadError naming the first parameter holding a NaN or an infinity (a damaged checkpoint
    served only empty answers): one float32 sum a parameter, no copy of it."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(torch.sum(param, dtype=torch.float32)):
            raise LoadError(f"parameter {name} holds NaN or infinite values: is the checkpoint damaged?")


def _copy_slices(params: dict[str, torch.Tensor], name: str, view, wanted: list[LoadSlice],
                 where: str) -> None:
    """Copy this rank's slices of checkpoint tensor `name` (a safetensors slice, or an
    mxfp4.PackedView) into their parameters."""
    shape = tuple(view.get_shape())
    for s in wanted:
        if shape != s.shape:
            raise LoadError(f"{where}: tensor {name} has shape {shape}, the model "
                            f"expects {s.shape} (for parameter {s.param})")
        if s.src_dim is None:
            part = view[:]
        else:
            idx = [slice(None)] * len(shape)
            idx[s.src_dim] = slice(s.src_start, s.src_start + s.length)
            part = view[tuple(idx)]                      # only this rank's slice
        destination(params, s).copy_(part)            # to device and dtype


def _tensor_files(files: list[Path]) -> dict[str, str]:
    """tensor name -> file name, from the files' headers (no index.json)."""
    located: dict[str, str] = {}
    for file in files:
        with open_safetensors(file, "pt", device="cpu") as f:
            located.update(dict.fromkeys(f.keys(), file.name))
    return located


def _load_packed(params: dict[str, torch.Tensor], name: str, wanted: list[LoadSlice],
                 folder: Path, located: dict[str, str]) -> None:
    """Tensor `name` from its MXFP4 `_blocks` / `_scales` pair, dequantized as it is read."""
    blocks, scales = mxfp4.packed_names(name)
    with open_safetensors(folder / located[blocks], "pt", device="cpu") as fb, \
            open_safetensors(folder / located[scales], "pt", device="cpu") as fs:
        try:
            view = mxfp4.PackedView(fb.get_slice(blocks), fs.get_slice(scales), name)
        except ValueError as e:
            raise LoadError(f"{located[blocks]}: {e}") from None
        _copy_slices(params, name, view, wanted, located[blocks])


def dummy_value(name: str, shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """A deterministic float32 tensor for checkpoint tensor `name`: norm weights 1,
    biases 0, everything else N(0, 0.02), seeded by (seed, name). MXFP4 pairs: random codes
    (`*_blocks`) and scales of 2^-7 (`*_scales`), weights of about that spread."""
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, device=device)
    if name.endswith(".bias") or name.endswith("correction_bias"):
        return torch.zeros(shape, device=device)
    if name.endswith(mxfp4.SCALES):
        return torch.full(shape, SCALE_BIAS - 7.0, device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith(mxfp4.BLOCKS):
        return torch.randint(0, 256, shape, generator=gen, device=device).float()
    return torch.randn(shape, generator=gen, device=device) * 0.02


def load_dummy(model: nn.Module, plan: ShardPlan, seed: int = 0) -> None:
    params = dict(model.named_parameters())
    zero_parameters(model)
    for name, slices in plan.slices.items():
        device = params[slices[0].param].device
        full = dummy_value(name, slices[0].shape, seed, device)
        for s in slices:
            part = full if s.src_dim is None else full.narrow(s.src_dim, s.src_start, s.length)
            destination(params, s).copy_(part)


def missing_names(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
