"""A record, in Triton's kernel cache, that start-up's batches once ran to the end over it.

Compile-ahead (compile_ahead.py) runs its batches in several threads because Triton releases
the GIL while it compiles, so compiles overlap. Over a cache that already holds every variant
nothing compiles: the batches are Python launching kernels, and more threads only contend for
the GIL (H200, 8B preset, a restart: 9.4 s for the batches in 8 threads beside a 0.7 s load;
the same batches in one thread took 4.0 s under cProfile, scripts/startup_phases.py
--warm-profile). The record tells the two cases apart: its name hashes what decides the
variants (Triton, torch, the GPU, the model's parameters, start-up's shapes, the kernel and
model sources), so changing any of them makes the next start a cold one again, and clearing
Triton's cache clears the record with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

import kernels
from appliance.model.compile_ahead import StartupShapes

log = logging.getLogger(__name__)

SOURCES = (Path(kernels.__file__).parent, Path(__file__).parent)  # kernels/, appliance/model/


def record_path(model: nn.Module, shapes: StartupShapes, kv_dtype: torch.dtype, page_size: int,
                device: torch.device) -> Path | None:
    """Where the record of these start-up batches over this model lives (None: no Triton
    cache directory is known)."""
    try:
        import triton
        cache = Path(triton.knobs.cache.dir)
    except (ImportError, AttributeError):
        return None
    key = hashlib.sha256()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    for part in (triton.__version__, torch.__version__, gpu,
                 type(model).__name__, str(kv_dtype), str(page_size),
                 repr(dataclasses.replace(shapes, also=())), str(len(shapes.also))):
        key.update(part.encode() + b"\0")
    for name, p in model.named_parameters():
        key.update(f"{name}:{tuple(p.shape)}:{p.dtype}\0".encode())
    for folder in SOURCES:
        for source in sorted(folder.rglob("*.py")):
            key.update(source.read_bytes())
    return cache / "tokenspeed" / f"startup-{key.hexdigest()[:32]}"


def compiled_before(path: Path | None) -> bool:
    return path is not None and path.is_file()


def remember(path: Path | None) -> None:
    """Leave the record (a cache that cannot be written is left as it is)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as e:
        log.debug("no start-up record in the Triton cache: %s", e)
