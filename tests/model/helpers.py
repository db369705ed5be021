"""Test helpers: tiny HF checkpoints, a minimal page allocator and a greedy driver.

The driver stands in for the C++ scheduler: it admits requests, cuts prompts into chunks,
puts decodes first in each batch (rows [0, num_decode)), allocates pages from a free list
and builds ForwardBatch tensors exactly as a Plan would (INTERFACES §1/§3).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from appliance.model import ForwardBatch, ModelRunner


def tiny_hf_config(family: str = "llama", **over):
    """A transformers config object for a tiny random model of `family`."""
    import transformers

    common = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        common["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}
        cfg = transformers.LlamaConfig(**{**common, **over})
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**{**common, "head_dim": 24, **over})
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, **over})
    else:
        raise ValueError(family)
    return cfg


def save_tiny_hf_model(folder: Path, family: str = "llama", seed: int = 0, **over) -> Path:
    """Build a seeded random HF model and `save_pretrained` it to `folder`."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **over)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def widen_weights(model) -> None:
    """Weights wider than HF's init (std 0.02 gives near-flat logits and near-tied router
    scores), every norm weight, bias and MoE correction bias perturbed, so that a swapped or
    unloaded tensor changes the greedy tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norm weights
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.2)


def hf_greedy(folder: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """HF transformers' greedy `generate`, one prompt at a time, never stopping early."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new,
                               do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        out.append(g[0, len(p):].tolist())
    return out


@dataclass
class _Req:
    prompt: list[int]
    max_new: int
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    kv_len: int = 0  # tokens already in the KV cache
    pages: list[int] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        self.free = list(range(num_pages - 1, -1, -1))  # hand out 0, 1, 2, ... in order

    def grow(self, req: _Req, length: int, page_size: int) -> None:
        while len(req.pages) * page_size < length:
            if not self.free:
                raise RuntimeError("test allocator out of pages")
            req.pages.append(self.free.pop())

    def release(self, req: _Req) -> None:
        self.free.extend(reversed(req.pages))
        req.pages = []


def greedy_generate(runner: ModelRunner, prompts: list[list[int]], max_new: int,
                    chunk: int | None = None, admit_per_step: int | None = None) -> list[list[int]]:
    """Greedy decode all prompts together: decodes and prefill chunks share mixed batches.

    chunk: most prompt tokens one row may prefill per step (None: whole prompt).
    admit_per_step: requests admitted per step (None: all at once), so that later requests
    prefill while earlier ones decode."""
    reqs = [_Req(list(p), max_new, tokens=list(p)) for p in prompts]
    alloc = PageAllocator(runner.num_pages)
    ps, dev = runner.page_size, runner.device
    admitted = 0
    while not all(r.done for r in reqs):
        admitted = min(len(reqs), admitted + (admit_per_step or len(reqs)))
        live = [r for r in reqs[:admitted] if not r.done]
        decodes = [r for r in live if r.kv_len >= len(r.prompt)]
        prefills = [r for r in live if r.kv_len < len(r.prompt)]
        rows: list[tuple[_Req, list[int]]] = []
        for r in decodes:
            rows.append((r, r.tokens[r.kv_len:]))
            assert len(rows[-1][1]) == 1
        for r in prefills:
            end = len(r.prompt) if chunk is None else min(len(r.prompt), r.kv_len + chunk)
            rows.append((r, r.tokens[r.kv_len:end]))
        ids, pos, qs, slots, prefix, seq = [], [], [0], [], [], []
        for r, new in rows:
            alloc.grow(r, r.kv_len + len(new), ps)
            for j, t in enumerate(new):
                p = r.kv_len + j
                ids.append(t)
                pos.append(p)
                slots.append(r.pages[p // ps] * ps + p % ps)
            qs.append(qs[-1] + len(new))
            prefix.append(r.kv_len)
            seq.append(r.kv_len + len(new))
        width = max(len(r.pages) for r, _ in rows)
        table = [r.pages + [0] * (width - len(r.pages)) for r, _ in rows]
        i32 = dict(dtype=torch.int32, device=dev)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, **i32), positions=torch.tensor(pos, **i32),
            query_start=torch.tensor(qs, **i32), prefix_lens=torch.tensor(prefix, **i32),
            seq_lens=torch.tensor(seq, **i32), page_table=torch.tensor(table, **i32),
            slot_mapping=torch.tensor(slots, **i32), num_decode=len(decodes))
        batch.validate()
        logits = runner.forward(batch)                               # [B, V]
        assert logits.shape == (len(rows), runner.vocab_size) and logits.dtype == torch.float32
        nxt = logits.argmax(dim=-1).tolist()
        for (r, new), t in zip(rows, nxt):
            r.kv_len += len(new)
            if r.kv_len == len(r.tokens):  # the row's last token: sample
                r.tokens.append(int(t))
                if r.done:
                    alloc.release(r)
    return [r.generated for r in reqs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_worker(rank: int, world: int, port: int, jobs: list[tuple], prompts: list[list[int]],
              max_new: int, out_dir: str, backend: str = "gloo") -> None:
    """One rank of a TP test (torch.multiprocessing.spawn): gloo, then for each job
    (model_cfg, runner_kwargs) build a runner and greedy-decode `prompts` in mixed batches.
    runner_kwargs may hold "module_attrs": {class name: {attribute: value}}, set on every
    module of that class once the model is built (e.g. a layer's path threshold).

    Writes rank{r}.json: per job, the tokens and the runner's num_pages."""
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    extra = {}
    if backend == "nccl":  # one GPU per rank
        torch.cuda.set_device(rank)
        extra["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, **extra)
    try:
        results = []
        for model_cfg, runner_kwargs in jobs:
            kw = dict(runner_kwargs)
            module_attrs = kw.pop("module_attrs", {})
            if "kv_num_pages" in kw:  # ranks ask for different sizes: all must take the min
                kw["kv_num_pages"] = kw["kv_num_pages"] + rank
            if backend == "nccl":
                kw["device"] = f"cuda:{rank}"
            runner = ModelRunner(model_cfg, tp_rank=rank, tp_size=world, **kw)
            for m in runner.model.modules():
                for name, value in module_attrs.get(type(m).__name__, {}).items():
                    setattr(m, name, value)
            tokens = greedy_generate(runner, prompts, max_new, chunk=5, admit_per_step=1)
            results.append({"tokens": tokens, "num_pages": runner.num_pages})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def run_tp(world: int, jobs: list[tuple], prompts: list[list[int]], max_new: int,
           out_dir: Path, backend: str = "gloo") -> list[list[dict]]:
    """Spawn `world` gloo ranks running tp_worker; result[job][rank] = {"tokens", "num_pages"}."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(tp_worker, args=(world, free_port(), jobs, prompts, max_new, str(out_dir), backend),
             nprocs=world, join=True)
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    return [[per_rank[r][j] for r in range(world)] for j in range(len(jobs))]


def check_graph_replay(runner: ModelRunner, steps: list[tuple[ForwardBatch, torch.Tensor]]
                       ) -> None:
    """CUDA-graph decode steps give the eager logits recorded in `steps`, graphs really replay,
    and a returned tensor is a copy (the next replay does not overwrite it)."""
    runner.enable_cuda_graphs(max_batch=4, max_model_len=1024)
    graphs = runner.decode_graphs
    replays = 0
    for batch, want in steps:
        if graphs.can_run(batch):
            replays += 1
        # replaying rewrites the same K/V the eager step wrote: the cache state is unchanged
        got = runner.forward(batch)                                      # [B, V]
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err < 2e-2, f"relative error {err:.2e} on a batch of {batch.num_rows} rows"
    assert replays >= 5 and sorted(graphs.graphs) == [1, 2, 4]
    decode = [b for b, _ in steps if graphs.can_run(b)]
    first = runner.forward(decode[0])
    keep = first.clone()
    runner.forward(decode[-1])
    assert torch.equal(first, keep)


def check_extend_replay(runner: ModelRunner, prompts: list[list[int]], max_new: int,
                        extra: list[ForwardBatch] = (), route_flips: int = 0,
                        tol: float = 2e-2) -> int:
    """With extend graphs captured, every step of a greedy run (and each `extra` batch after
    it) gives the eager forward's logits; returns how many steps replayed an extend graph.
    route_flips: rows a step may have past the tolerance (within 0.1, same argmax), for MoE
    models whose near-tied router scores flip an expert on the last bit of a GEMM that cuBLAS
    tiles differently at the graph's padded row count (H200, Qwen3-Coder's 128 experts top-8,
    dummy weights: one row at 4.7e-2, the rest under 1e-2; eager is bit-reproducible). tol:
    the relative error an extend row's logits may have (over an FP8 cache an eager chunk may
    read its own K/V unquantized where a graph's reads them back from the cache); a decode
    row's stay within 2e-2 even then (the first num_decode logits rows: decodes come first)."""
    eager_forward, replays = runner.forward, 0

    def both(batch: ForwardBatch) -> torch.Tensor:
        nonlocal replays
        graphs = runner.extend_graphs
        if not runner.decode_graphs.can_run(batch) and graphs.bucket(batch) is not None:
            replays += 1
        got = eager_forward(batch)          # replays a graph where one fits (the step's K/V)
        with torch.inference_mode():        # rewrites the same K/V eagerly
            want = runner._logits(runner.model(batch), batch.num_logits)
        rows = (got - want).abs().amax(-1) / want.abs().max()                  # [rows]
        err = rows.max().item()
        decodes = rows[:batch.num_decode]      # a looser tol is for extend rows only
        assert tol <= 2e-2 or decodes.numel() == 0 or decodes.max().item() < 2e-2, \
            f"decode rows' relative error {decodes.max().item():.2e}"
        past = int((rows >= tol).sum())
        assert err < tol or (past <= route_flips and err < 0.1 and torch.equal(
            got.argmax(-1), want.argmax(-1))), \
            f"relative error {err:.2e} on a step of {batch.num_tokens} tokens ({past} rows past {tol})"
        return got

    runner.forward = both
    try:
        greedy_generate(runner, prompts, max_new, chunk=32, admit_per_step=1)
        for batch in extra:
            both(batch)
    finally:
        del runner.forward
    return replays


def assert_steps_match(runner: ModelRunner, steps: list[tuple[ForwardBatch, torch.Tensor]],
                       tol: float = 4e-2, route_flips: int = 0) -> None:
    """`runner` gives the logits recorded in `steps` (batch, logits) within `tol` of its
    largest magnitude, batch by batch. route_flips: rows a batch may have past `tol` (within
    0.1, same argmax), for MoE models whose near-tied router scores flip an expert on the
    last bit (check_extend_replay)."""
    for batch, recorded in steps:
        want = runner.forward(batch)                                     # [B, V]
        rows = (recorded - want).abs().amax(-1) / want.abs().max()       # [B]
        err, past = rows.max().item(), int((rows >= tol).sum())
        assert err < tol or (past <= route_flips and err < 0.1 and torch.equal(
            recorded.argmax(-1), want.argmax(-1))), \
            f"relative error {err:.2e} on a batch of {batch.num_rows} rows ({past} past {tol})"


def assert_each_prompt_alone(folder: Path, prompts: list[list[int]], want: list[list[int]],
                             max_new: int) -> None:
    """Greedy tokens of each prompt decoded on its own (4-token pages) equal `want`."""
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    for prompt, expected in zip(prompts, want):
        assert greedy_generate(runner, [prompt], max_new) == [expected]
