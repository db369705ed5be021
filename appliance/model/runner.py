"""ModelRunner: build the model for this rank, load its weights, own its KV cache, run steps.

    runner = ModelRunner("path/to/hf_folder", device="cpu", dtype=torch.float32,
                         tp_rank=0, tp_size=1, kv_num_pages=512, page_size=16)
    logits = runner.forward(batch)      # [N, vocab] float32: each row's last token, or
                                        # every token listed in batch.logit_index
    logits, hidden = runner.forward_hidden(batch)   # ... and every token's hidden state
    logits, z = runner.forward_next_token(0, ids, hidden, batch, rows)   # an MTP layer

`model_cfg` is an HF checkpoint folder (str / Path), an HF config dict (dummy weights), or a
`ModelSource` (path or preset, load_format, seed). With tp_size > 1 the caller has already
initialised torch.distributed (gloo on CPU, nccl on GPU); every rank builds the same model
on its own shard and all ranks agree on num_pages (the minimum). `moe_parallel` (YAML
`parallel.moe`): "tp" splits each expert over the ranks, "ep" places whole experts per rank.

KV sizing: `kv_num_pages` if given; else `memory_fraction` of the device. On CUDA, after the
weights are loaded, the cache gets `free - (1 - fraction) * total` bytes (torch.cuda
mem_get_info), i.e. the process may use `fraction` of the card. On CPU there is no
meaningful "free memory", so the cache gets `fraction * CPU_KV_BUDGET_BYTES` (512 MiB).
`kv_dtype` (YAML `kv.dtype`): the cache's element type, the model's dtype by default or FP8
e4m3 (one byte: twice the pages of a bf16 cache in the same bytes), for models whose KV
layers read it (`reads_fp8_kv`; not MLA), with per-layer scales from the checkpoint when it
has them (kv_scales.py).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from appliance.model import presets
from appliance.model.batch import ForwardBatch
from appliance.model.comm import World
from appliance.model.compiler import CompiledModel, compile_model
from appliance.model.context import BuildContext
from appliance.model.cuda_graph import DecodeGraphs
from appliance.model.extend_graph import ExtendGraphs, graph_logits
from appliance.model.kv_scales import apply_checkpoint_kv_scales
from appliance.model.compile_ahead import CompileAhead, StartupShapes, compile_threads
from appliance.model.loader import (check_finite, checkpoint_tensor_names, load_checkpoint,
                                    load_dummy, read_eos_token_ids, read_hf_config,
                                    zero_parameters)
from appliance.model.layers.norm import fold_scales, plan_scale_folds
from appliance.model.layers.yarn import context_length
from appliance.model.models import model_class
from appliance.model.placement import ParallelLayout
from appliance.model.warm_up import warm_up_batches

CPU_KV_BUDGET_BYTES = 512 * 1024 * 1024
# (stage, None) when a start-up stage begins, (stage, what it did) when it ends.
StageReport = Callable[[str, "str | None"], None]

log = logging.getLogger("tokenspeed.model")

# YAML kv.dtype -> the cache's element dtype (None: the model's)
KV_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp8_e4m3": torch.float8_e4m3fn}


class KVDtypeError(ValueError):
    """A KV cache dtype this model cannot use; the message names kv.dtype."""


def kv_dtype_name(kv_dtype: torch.dtype) -> str:
    """How start-up reports a cache dtype: YAML's name for FP8, torch's for the others."""
    names = {v: k for k, v in KV_DTYPES.items() if v is not None}
    return names.get(kv_dtype, str(kv_dtype).removeprefix("torch."))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: an HF folder, or a preset / HF config dict for dummy weights."""

    path: str | None = None
    preset: str | None = None
    load_format: str = "auto"  # auto | safetensors | dummy
    seed: int = 0
    hf_config: dict[str, Any] | None = field(default=None, compare=False)
    hf_overrides: dict[str, Any] | None = field(default=None, compare=False)
    # a GGUF checkpoint's folder of metadata the frontend parsed once (gguf_files.py)
    prepared: str | None = None

    @staticmethod
    def coerce(obj: Any) -> "ModelSource":
        if isinstance(obj, ModelSource):
            return obj
        if isinstance(obj, (str, Path)):
            return ModelSource(path=str(obj))
        if isinstance(obj, dict):
            return ModelSource(load_format="dummy", hf_config=obj)
        raise TypeError(f"model_cfg must be a folder, an HF config dict or a ModelSource, "
                        f"not {type(obj).__name__}")

    def config(self) -> dict[str, Any]:
        if self.hf_config is not None:
            cfg = dict(self.hf_config)
        elif self.preset is not None and (self.path is None or self.load_format == "dummy"):
            cfg = presets.preset_config(self.preset)
        elif self.path is not None:
            cfg = read_hf_config(self.path, self.prepared)  # real weights, or dummy of its shape
        else:
            raise ValueError("ModelSource needs a path, a preset or an hf_config")
        cfg.update(self.hf_overrides or {})
        return cfg


def _materialize(model: nn.Module, device: torch.device) -> None:
    """meta -> uninitialised storage on `device`, keeping shared (tied) parameters shared.
    One torch.empty a parameter: nn.Module.to_empty goes through empty_like's Python
    reference for meta tensors (0.6-0.8 s here for any model size, against ~1 ms)."""
    fresh: dict[int, nn.Parameter] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is None:
                continue
            if id(p) not in fresh:
                fresh[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                            requires_grad=p.requires_grad)
            m._parameters[name] = fresh[id(p)]
    for m in model.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers(device)


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def use_cuda_graphs(device: torch.device, dtype: torch.dtype, overrides: dict[str, str]) -> bool:
    """CUDA graphs for decode steps: TOKENSPEED_CUDA_GRAPHS=1 / 0 forces them on / off; by
    default on for CUDA with 16-bit weights and no kernel overrides, where every op is a
    Triton kernel without host syncs (tests/model/test_*_cuda.py replay them against eager).
    float32 and overridden ops may run the torch reference kernels, which read sequence
    lengths on the host and cannot be captured."""
    forced = os.environ.get("TOKENSPEED_CUDA_GRAPHS", "")
    if device.type != "cuda" or forced == "0":
        return False
    return forced == "1" or (dtype in (torch.float16, torch.bfloat16) and not overrides)


def startup_shapes(config: Any, max_len: int, graphs: bool,
                   also: tuple[Callable[[], object], ...] = ()) -> StartupShapes | None:
    """What `from_config` runs after the load, and `also` (more launches), for compiling it
    ahead (compile_ahead.py); None when TOKENSPEED_COMPILE_AHEAD=0."""
    if os.environ.get("TOKENSPEED_COMPILE_AHEAD", "") == "0":
        return None
    rows, logits = graph_size(config) if graphs else (0, 0)
    tokens = int(config.scheduler.max_batch_tokens)
    return StartupShapes(graph_rows=rows,
                         extend_tokens=min(tokens, EXTEND_GRAPH_TOKENS) if graphs else 0,
                         max_len=max_len, hidden=config.speculative.method == "mtp",
                         warm_up_tokens=tokens, also=also, graph_logits=logits)


def graph_size(config: Any) -> tuple[int, int]:
    """Rows and logits rows of the largest CUDA-graph step: the scheduler's running requests
    (at most 256), and with speculation a logits row per verify token (graph_logits)."""
    rows = min(int(config.scheduler.max_running), 256)
    drafts = 0 if config.speculative.method == "off" else int(config.speculative.max_draft)
    return rows, graph_logits(rows, drafts)


def model_source(config: Any, files: Any) -> ModelSource:
    """The model `from_config` builds for the daemon's AppConfig and model files: the
    checkpoint, or dummy weights (a preset, or `model.load_format: dummy`)."""
    dummy = files.checkpoint is None or config.model.load_format == "dummy"
    gguf = files.checkpoint is not None and Path(files.checkpoint).suffix == ".gguf"
    return ModelSource(path=files.checkpoint, preset=files.preset,
                       load_format="dummy" if dummy else "auto", seed=config.model.seed,
                       prepared=files.tokenizer if gguf else None)  # its folder (model_files)


def vocabulary(source: ModelSource, hf_config: dict | None = None) -> tuple[int, list[int]]:
    """The logits' vocabulary size and the end-of-sequence ids of `source`'s model, from its
    config files alone (no weights)."""
    hf_config = source.config() if hf_config is None else hf_config
    folder = source.path if source.load_format != "dummy" else None
    return int(hf_config["vocab_size"]), read_eos_token_ids(folder, hf_config)


# Extend steps (prefill chunks, verify rows) are captured up to this many tokens: their
# eager host cost (~25 ms on an 8B) exceeds the GPU's time up to about 1K tokens
EXTEND_GRAPH_TOKENS = 2048


def use_extend_graphs(kv_layers: list[nn.Module]) -> bool:
    """Extend steps replay CUDA graphs when every KV layer's extend path can read its layout
    on the device (`captures_extend`: GQA attention, and MLA for the steps it attends
    absorbed) and TOKENSPEED_EXTEND_GRAPHS is not 0."""
    if os.environ.get("TOKENSPEED_EXTEND_GRAPHS", "") == "0":
        return False
    return bool(kv_layers) and all(getattr(m, "captures_extend", False) for m in kv_layers)


def replays_extend(kv_layers: list[nn.Module], batch: ForwardBatch) -> bool:
    """Whether every KV layer takes `batch` the way its extend graph was captured (MLA: the
    absorbed path; a layer without `replays_extend` always does)."""
    return all(m.replays_extend(batch) for m in kv_layers if hasattr(m, "replays_extend"))


def moe_layout(tp_rank: int, tp_size: int, moe_parallel: str) -> ParallelLayout:
    """The tensor-parallel layout with YAML `parallel.moe`: "tp" splits every expert's
    intermediate dim over all ranks, "ep" gives each rank whole experts (E / tp_size)."""
    if moe_parallel not in ("tp", "ep"):
        raise ValueError(f"parallel.moe must be 'tp' or 'ep', got {moe_parallel!r}")
    return ParallelLayout.tensor_parallel(tp_rank, tp_size,
                                          tp_size if moe_parallel == "ep" else 1)


class KVPoolError(ValueError):
    """The KV pool asked for does not fit (its message names the setting)."""


class ModelRunner:
    def __init__(self, model_cfg: Any, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, tp_rank: int = 0, tp_size: int = 1,
                 kv_num_pages: int | None = None, memory_fraction: float | None = None,
                 page_size: int = 16, moe_parallel: str = "tp",
                 kv_dtype: torch.dtype | None = None,
                 startup: StartupShapes | None = None) -> None:
        """`startup`: on CUDA, what start-up runs after the load, compiled beside it
        (compile_ahead.py; its summary in `compile_summary`)."""
        self.source = ModelSource.coerce(model_cfg)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)  # NCCL collectives use the current device
        self.dtype, self.page_size = dtype, page_size
        self.kv_dtype = kv_dtype or dtype
        self.layout = moe_layout(tp_rank, tp_size, moe_parallel)
        self.world = World(self.layout)
        self.hf_config = self.source.config()
        self.vocab_size, self.eos_token_ids = vocabulary(self.source, self.hf_config)
        self.max_model_len = context_length(self.hf_config)
        folder = self.source.path if self.source.load_format != "dummy" else None

        names = (checkpoint_tensor_names(folder, self.source.prepared) if folder is not None
                 else None)
        ctx = BuildContext(self.layout, self.device, dtype, page_size, names,
                           self.kv_dtype if self.kv_dtype != dtype else None)
        cls = model_class(self.hf_config.get("architectures"))
        with torch.device("meta"):
            model: nn.Module = cls(self.hf_config, ctx)
        self._check_kv_dtype(model)
        model.to(dtype)                                 # still meta: free
        self.compiled: CompiledModel = compile_model(model, self.layout, self.world)
        _materialize(model, self.device)
        self._kv_layers = [m for m in model.modules() if hasattr(m, "kv_cache_shapes")]
        # before compile-ahead, which must build the unit-scale norms' kernels
        plan_scale_folds(model)
        ahead = self._compile_ahead(model, startup, tp_size)
        started = time.perf_counter()
        try:
            self._load(model, folder, names)
            self.load_seconds = time.perf_counter() - started
        finally:
            self.compile_summary = ahead.join() if ahead is not None else None
        fold_scales(model)
        self.compiled_ahead = ahead is not None and ahead.ran_all
        self.model = model.eval()
        self.num_pages = self._plan_pages(kv_num_pages, memory_fraction)
        self.kv_caches: list[tuple[torch.Tensor, ...]] = []
        for layer in self._kv_layers:
            caches = tuple(torch.zeros(self.num_pages * page_size, *shape, dtype=self.kv_dtype,
                                       device=self.device)              # [S, *shape]
                           for shape in layer.kv_cache_shapes())
            layer.bind_kv_cache(caches)
            self.kv_caches.append(caches)
        log.info("KV cache: %s", self.kv_summary())
        self.decode_graphs: DecodeGraphs | None = None
        self.extend_graphs: ExtendGraphs | None = None
        self._graphs_hidden = False  # the graphs return forward_hidden's pair

    def _load(self, model: nn.Module, folder: str | None, names: list[str] | None) -> None:
        if folder is None:
            load_dummy(model, self.compiled.shard_plan, self.source.seed)
            return
        load_checkpoint(model, self.compiled.shard_plan, folder, self.source.prepared)
        check_finite(model)
        if self.kv_dtype != self.dtype:
            scaled = apply_checkpoint_kv_scales(model, folder, names)
            log.info("FP8 KV cache scales: %s", f"from the checkpoint for {scaled} layers"
                     if scaled else "1.0 (the checkpoint has none)")

    def _compile_ahead(self, model: nn.Module, startup: StartupShapes | None,
                       tp_size: int) -> CompileAhead | None:
        """Start compiling start-up's kernels over the zeroed parameters (compile_ahead.py)."""
        if startup is None or self.device.type != "cuda":
            return None
        if startup.extend_tokens and not use_extend_graphs(self._kv_layers):
            startup = replace(startup, extend_tokens=0)
        free, _ = torch.cuda.mem_get_info(self.device)
        threads = compile_threads(tp_size, os.cpu_count() or 1, free)
        if threads == 0:
            log.info("compiling ahead: skipped, %s free beside the weights", _bytes(free))
            return None
        zero_parameters(model)
        return CompileAhead(model, self._kv_layers, self.kv_dtype, startup, self.page_size,
                            self.device, threads)

    @property
    def num_mtp_layers(self) -> int:
        """The model's multi-token-prediction layers (appliance/model/mtp.py) that loaded."""
        return len(getattr(self.model, "mtp_layers", ()))

    def _check_kv_dtype(self, model: nn.Module) -> None:
        """Refuse a quantized cache for a model with KV layers that cannot read it."""
        if self.kv_dtype == self.dtype:
            return
        if self.kv_dtype not in KV_DTYPES.values():
            raise KVDtypeError(f"kv.dtype: a {self.kv_dtype} cache is not supported (one of "
                               f"{', '.join(KV_DTYPES)})")
        if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(self.device)
            raise KVDtypeError(f"kv.dtype: {kv_dtype_name(self.kv_dtype)} needs a GPU that "
                               f"converts FP8 (sm_89+: Ada, Hopper); this one is sm_{major}{minor}")
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if hasattr(m, "kv_cache_shapes") and not getattr(m, "reads_fp8_kv", False)})
        if kinds:
            raise KVDtypeError(f"kv.dtype: {kv_dtype_name(self.kv_dtype)} is not supported by "
                               f"this model's attention ({', '.join(kinds)}: no FP8 cache "
                               "kernels yet); use kv.dtype: auto")

    def kv_summary(self) -> str:
        """The pool as start-up reports it: pages, tokens, element dtype, bytes."""
        total = self.num_pages * self.kv_bytes_per_page()
        return (f"{self.num_pages} pages of {self.page_size} tokens "
                f"({self.num_pages * self.page_size} tokens), {kv_dtype_name(self.kv_dtype)}, "
                f"{_bytes(total)}")

    @classmethod
    def from_config(cls, config: Any, files: Any, device: str | torch.device,
                    dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
                    on_stage: StageReport | None = None,
                    compile_also: tuple[Callable[[], object], ...] = ()) -> "ModelRunner":
        """From the daemon's AppConfig and resolved model files (appliance.engine.model_files):
        `files.checkpoint` (HF folder) or `files.preset` (dummy weights). On CUDA, decode
        steps of up to min(scheduler.max_running, 256) rows run as CUDA graphs (see
        `use_cuda_graphs`; with `speculative.method: mtp` they return the hidden states too).
        `on_stage` hears each start-up stage begin and end; `compile_also`: the caller's
        own start-up launches (the engine's sampler warm-up), compiled ahead with the
        runner's."""
        report = on_stage or (lambda stage, summary: None)
        source = model_source(config, files)
        asked, context = int(config.model.max_model_len), context_length(source.config())
        max_len = min(asked, context)
        if asked > context:  # served, but not silently: requests past it get 400s
            log.warning("model.max_model_len %d is more than the model's context length %d: "
                        "serving %d tokens", asked, context, context)
        graphs = use_cuda_graphs(torch.device(device), dtype, dict(config.kernels.override))
        startup = startup_shapes(config, max_len, graphs, compile_also)
        report("weights", None)
        try:
            runner = cls(source, device, dtype, tp_rank, tp_size,
                         kv_num_pages=config.kv.num_pages,
                         memory_fraction=config.kv.memory_fraction,
                         page_size=config.kv.page_size, moe_parallel=config.parallel.moe,
                         kv_dtype=KV_DTYPES[config.kv.dtype], startup=startup)
        except KVDtypeError as e:
            from appliance.config import ConfigError   # the daemon's settings error
            raise ConfigError(str(e)) from None
        seconds = max(runner.load_seconds, 1e-9)
        size = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        report("weights", f"{_bytes(size)}{' per rank' if tp_size > 1 else ''} in {seconds:.1f} s "
                          f"({_bytes(size / seconds)}/s); KV cache {runner.kv_summary()}")
        if runner.compile_summary is not None:
            report("kernels", runner.compile_summary)
        if graphs:
            report("CUDA graphs", None)
            started = time.perf_counter()
            rows, logits = graph_size(config)
            runner.enable_cuda_graphs(rows, max_len, hidden=config.speculative.method == "mtp",
                                      max_extend_tokens=int(config.scheduler.max_batch_tokens),
                                      max_logits=logits)
            extend = runner.extend_graphs
            report("CUDA graphs", f"{len(runner.decode_graphs.buckets)} decode batch sizes"
                                  + (f", {len(extend.buckets)} extend token counts"
                                     if extend is not None else "")
                                  + f" in {time.perf_counter() - started:.1f} s")
        if runner.device.type == "cuda" and not runner.compiled_ahead:
            report("warm-up", None)
            started = time.perf_counter()
            runner.warm_up(int(config.scheduler.max_batch_tokens), max_len)
            report("warm-up", f"{time.perf_counter() - started:.1f} s")
        return runner

    @torch.inference_mode()
    def warm_up(self, max_tokens: int, max_len: int | None = None) -> None:
        """Run the eager batches of appliance/model/warm_up.py (nothing is written to the KV
        cache), so that prefill and mixed steps find their kernels compiled."""
        started = time.perf_counter()
        batches = warm_up_batches(max_tokens, max_len or self.max_model_len, self.page_size,
                                  self.device)
        for batch in batches:
            self.model(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("warm-up: %d eager batches in %.1f s", len(batches),
                 time.perf_counter() - started)

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int | None = None,
                           hidden: bool = False, max_extend_tokens: int = 0,
                           max_logits: int | None = None) -> None:
        """Capture decode-only steps of up to `max_batch` rows whose sequences fit
        `max_model_len` tokens (default: the model's) as CUDA graphs; `hidden`: of
        `forward_hidden` (then `forward` runs graph steps eagerly). With `max_extend_tokens`,
        also steps with prefill or verify rows of up to min(that, EXTEND_GRAPH_TOKENS) tokens
        (`use_extend_graphs`), with `max_logits` logits rows (default max_batch; more for
        speculative verify steps: extend_graph.graph_logits)."""
        max_len = max_model_len or self.max_model_len
        max_pages = -(-max_len // self.page_size)
        forward = self.model.forward_hidden if hidden else None
        started = time.perf_counter()
        self.decode_graphs = DecodeGraphs(self.model, self.device, max_batch, max_pages,
                                          forward=forward)
        self._graphs_hidden = hidden
        log.info("CUDA graphs of decode steps captured for batch sizes %s in %.1f s",
                 self.decode_graphs.buckets, time.perf_counter() - started)
        tokens = min(max_extend_tokens, EXTEND_GRAPH_TOKENS)
        if tokens < 1 or not use_extend_graphs(self._kv_layers):
            return
        started = time.perf_counter()
        self.extend_graphs = ExtendGraphs(self.model, self.device, max_batch, max_pages,
                                          max_logits=max_logits or max_batch, max_tokens=tokens,
                                          forward=forward, pool=self.decode_graphs.pool)
        log.info("CUDA graphs of extend steps captured for token counts %s in %.1f s",
                 self.extend_graphs.buckets, time.perf_counter() - started)

    def kv_bytes_per_page(self) -> int:
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return sum(self.page_size * math.prod(shape) * elem
                   for layer in self._kv_layers for shape in layer.kv_cache_shapes())

    def _plan_pages(self, kv_num_pages: int | None, memory_fraction: float | None) -> int:
        if kv_num_pages is not None:
            pages = int(kv_num_pages)
            self._check_pool_fits(pages)
        else:
            fraction = 0.85 if memory_fraction is None else float(memory_fraction)
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"kv memory_fraction must be in (0, 1], got {fraction}")
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                budget = free - (1.0 - fraction) * total
            else:
                budget = fraction * CPU_KV_BUDGET_BYTES
            pages = int(budget // max(1, self.kv_bytes_per_page()))
        pages = self.world.min_int(pages)
        if pages < 1:
            raise KVPoolError(f"no room for the KV cache: {pages} pages of "
                             f"{self.kv_bytes_per_page()} bytes (raise kv.memory_fraction or set "
                             "kv.num_pages)")
        return pages

    def _check_pool_fits(self, pages: int) -> None:
        """KVPoolError naming kv.num_pages when the pool asked for is larger than the memory
        there is (the allocation failed with a traceback)."""
        if self.device.type == "cuda":
            room, where = torch.cuda.mem_get_info(self.device)[0], "free on the GPU"
        else:
            room, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of memory"
        need = pages * self.kv_bytes_per_page()
        if need > room:
            raise KVPoolError(f"kv.num_pages: {pages} pages of {self.kv_bytes_per_page()} bytes "
                              f"need {_bytes(need)}, more than the {_bytes(room)} {where}")

    def _replay(self, batch: ForwardBatch):
        """The graph outputs of `batch` (views of reused buffers), or None: it runs eagerly."""
        if self.decode_graphs is not None and self.decode_graphs.can_run(batch):
            return self.decode_graphs.run(batch)
        tokens = self.extend_bucket(batch)
        return None if tokens is None else self.extend_graphs.run(batch, tokens)

    def extend_bucket(self, batch: ForwardBatch) -> int | None:
        """The token count of the extend graph `batch` replays (None: no extend graph)."""
        if self.extend_graphs is None:
            return None
        tokens = self.extend_graphs.bucket(batch)
        return tokens if tokens is not None and replays_extend(self._kv_layers, batch) else None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """logits [N, vocab] float32 of each row's last token (N = B), or of the tokens in
        batch.logit_index (speculative verify rows); the same on every rank. Steps replay
        CUDA graphs where they fit one (decode-only steps; extend steps up to a token count),
        else run eagerly."""
        batch.validate()
        logits = None if self._graphs_hidden else self._replay(batch)   # [N, V_padded]
        if logits is not None:
            return logits[:, : self.vocab_size].to(torch.float32, copy=True)
        return self._logits(self.model(batch), batch.num_logits)

    @torch.inference_mode()
    def forward_hidden(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s logits and hidden [T, H]: every token's state after the final norm (a
        model with MTP layers; what they read)."""
        batch.validate()
        out = self._replay(batch) if self._graphs_hidden else None
        if out is not None:
            logits, hidden = out
            return logits[:, : self.vocab_size].to(torch.float32, copy=True), hidden.clone()
        logits, hidden = self.model.forward_hidden(batch)
        return self._logits(logits, batch.num_logits), hidden

    @torch.inference_mode()
    def forward_next_token(self, layer_idx: int, input_ids: torch.Tensor, hidden: torch.Tensor,
                           batch: ForwardBatch, rows: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP layer `layer_idx` over `batch` (input_ids [T]: the token after each position,
        hidden [T, H] the state at it) -> (logits [R, vocab] float32, normed state [R, H]) of
        the tokens `rows` names; writes that layer's KV cache at the batch's slots."""
        logits, z = self.model.forward_next_token(layer_idx, input_ids, hidden, batch, rows)
        return self._logits(logits, rows.shape[0]), z

    def _logits(self, logits: torch.Tensor, expected: int) -> torch.Tensor:
        """[N, V_padded] -> [N, vocab] float32, after checking the row count."""
        if logits.shape[0] != expected:
            raise ValueError(f"{type(self.model).__name__} returned {logits.shape[0]} logits "
                             f"rows for {expected} (does it read logit_token_index?)")
        return logits[:, : self.vocab_size].float()
