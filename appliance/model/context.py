"""What every module constructor gets besides its HF config: where and how it is built."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from appliance.model.placement import ParallelLayout


@dataclass(frozen=True)
class BuildContext:
    layout: ParallelLayout  # this rank's parallel groups
    device: torch.device  # where the weights will live (modules are built on "meta" first)
    dtype: torch.dtype  # weight / activation dtype
    page_size: int  # tokens per KV page
    # the checkpoint's tensor names (None: dummy weights), for models whose optional parts
    # a checkpoint may lack (GLM's MTP layers, which transformers does not save)
    checkpoint_tensors: frozenset[str] | None = field(default=None, compare=False)
    # the KV cache's element dtype when it differs from `dtype` (FP8: YAML kv.dtype), else None
    kv_dtype: torch.dtype | None = None

    @staticmethod
    def single(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               page_size: int = 16) -> "BuildContext":
        return BuildContext(ParallelLayout.single(), torch.device(device), dtype, page_size)
