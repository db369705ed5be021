"""The ceilings and baselines scripts/gpu_models prints beside the daemon's figures, measured on
this GPU in the same run.

    python scripts/gpu_models.py bounds qwen3-coder-30b-a3b llama-3.1-8b > bounds.json
    python scripts/gpu_models.py hf qwen3-coder-30b-a3b > hf.json
    python scripts/gpu_models.py report OUT_FOLDER

`bounds`: the copy bandwidth (kernel_bench's ceiling: 2 GiB device copy, read + write) and,
per preset, the bytes a decode step reads: at batch 1 the active parameters (attention, norms,
the float32 router, top_k of the experts, one embedding row, the LM head); at batch B the
experts B tokens touch, E * (1 - (1 - k/E)^B) of E (routing taken as uniform, as with dummy
weights), plus the KV cache of B sequences at their mean length. bound = B / (bytes / bw).
`hf`: transformers' generate on the same shape (random init, bf16, its default attention and
experts implementation, no compile): batch-1 decode tok/s, and at batch 64 and 256 with
1000-token prompts the prefill time and the decode tok/s (16 steps).
`report`: one table from the JSON files of a run.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

BF16 = torch.bfloat16
THROUGHPUT_BATCHES = (64, 256)
PROMPT, OUTPUT = 1000, 1000            # the throughput bench's request shape
HF_DECODE_STEPS = 16


def _meta_model(preset: str) -> tuple[torch.nn.Module, dict]:
    from appliance.model.context import BuildContext
    from appliance.model.models import model_class
    from appliance.model.presets import preset_config

    cfg = preset_config(preset)
    with torch.device("meta"):
        model = model_class(cfg["architectures"])(cfg, BuildContext.single("meta", BF16))
    return model.to(BF16), cfg


def step_bytes(preset: str, batch: int, mean_len: float) -> float:
    """Bytes one decode step of `batch` sequences of `mean_len` tokens reads (module doc)."""
    from appliance.model.layers.embedding import VocabParallelEmbedding
    from appliance.model.layers.moe import RoutedExperts

    model, cfg = _meta_model(preset)
    total = 0.0
    for name, module in model.named_modules():
        if name.startswith("mtp_layers"):          # run only by MTP drafts
            continue
        own = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        if isinstance(module, RoutedExperts):
            e, k = module.num_local, module.cfg.top_k
            own *= 1 - (1 - k / e) ** batch            # expected share of experts touched
        elif isinstance(module, VocabParallelEmbedding):
            own *= min(batch, module.weight.shape[0]) / module.weight.shape[0]
        total += own
    kv = sum(math.prod(shape) for m in model.modules() if hasattr(m, "kv_cache_shapes")
             for shape in m.kv_cache_shapes()) * 2    # bf16 per token
    return total + batch * mean_len * kv


def bounds(presets: list[str]) -> dict:
    from kernel_bench.harness import measure_ceilings   # scripts/ is sys.path[0]

    bw = measure_ceilings().copy_gbs * 1e9               # bytes/s
    out = {"device": torch.cuda.get_device_name(), "copy_gbs": bw / 1e9, "presets": {}}
    for preset in presets:
        rows = {"batch1_bytes": step_bytes(preset, 1, 0.0)}
        rows["batch1_bound_tps"] = bw / rows["batch1_bytes"]
        for b in THROUGHPUT_BATCHES:   # decode of 1000-in/1000-out: mean length 1500
            rows[f"batch{b}_bound_tps"] = b * bw / step_bytes(preset, b, PROMPT + OUTPUT / 2)
        out["presets"][preset] = rows
    return out


def _timed(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def hf(preset: str) -> dict:
    """transformers on the preset's shape (module doc); OOM at a batch is reported as such."""
    import transformers

    from appliance.model.presets import preset_config

    cfg = preset_config(preset)
    fields = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type",
                                                         "torch_dtype")}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **fields)
    torch.set_default_dtype(BF16)   # bf16 parameters with transformers 4.x and 5.x alike
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    torch.set_default_dtype(torch.float32)
    out = {"transformers": transformers.__version__,
           "attention": getattr(model.config, "_attn_implementation", "?"),
           "experts": getattr(model.config, "_experts_implementation", "per-expert loop")}
    gen = torch.Generator(device="cuda").manual_seed(0)

    def run(batch: int, prompt: int, new: int) -> float:
        ids = torch.randint(10, 500, (batch, prompt), device="cuda", generator=gen)
        kw = dict(do_sample=False, min_new_tokens=new, max_new_tokens=new, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            return _timed(lambda: model.generate(ids, **kw))

    run(1, 16, 4)                                         # warm-up
    steps = 64
    out["batch1_decode_tps"] = steps / (run(1, 128, steps + 1) - run(1, 128, 1))
    for b in THROUGHPUT_BATCHES:
        try:
            prefill = run(b, PROMPT, 1)
            decode = run(b, PROMPT, HF_DECODE_STEPS + 1) - prefill
            out[f"batch{b}_prefill_s"] = prefill
            out[f"batch{b}_decode_tps"] = b * HF_DECODE_STEPS / decode
        except torch.cuda.OutOfMemoryError:
            out[f"batch{b}_decode_tps"] = "OOM"
        torch.cuda.empty_cache()
    return out


def _bench(folder: Path, name: str) -> dict:
    path = folder / f"bench-{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def report(folder: Path) -> None:
    b = json.loads((folder / "bounds.json").read_text())
    h = json.loads((folder / "hf.json").read_text()) if (folder / "hf.json").exists() else {}
    print(f"device {b['device']}, copy bandwidth {b['copy_gbs']:.0f} GB/s (read + write); "
          f"transformers {h.get('transformers', '?')} ({h.get('attention', '?')} attention, "
          f"{h.get('experts', '?')} experts)")
    print(f"{'preset':22} {'run':34} {'ours tok/s':>11} {'bound':>9} {'% bound':>8} "
          f"{'HF tok/s':>9}")
    for preset, rows in b["presets"].items():
        runs = [("batch-1 decode (latency bench)", "latency", "decode_tps_mean", 1)]
        runs += [(f"1000/1000 concurrency {c}", f"throughput-{c}", "output_tokens_per_s", c)
                 for c in THROUGHPUT_BATCHES]
        for label, bench, key, batch in runs:
            ours = _bench(folder, f"{preset}-{bench}").get(key)
            bound = rows[f"batch{batch}_bound_tps"]
            theirs = h.get(f"batch{batch}_decode_tps", "-") if preset == h.get("preset") else "-"
            pct = f"{100 * ours / bound:7.1f}%" if isinstance(ours, (int, float)) else "-"
            ours_s = f"{ours:11.1f}" if isinstance(ours, (int, float)) else f"{'-':>11}"
            theirs_s = f"{theirs:9.1f}" if isinstance(theirs, float) else f"{theirs:>9}"
            print(f"{preset:22} {label:34} {ours_s} {bound:9.1f} {pct:>8} {theirs_s}")
    print("bound: batch 1 = copy bandwidth / active bytes per token; concurrency C = C tokens "
          "per decode step / (weights the step touches + KV at the mean length 1500); a "
          "decode-only bound: ours includes the prefill")
    if h:
        print("HF prefill of 1000-token prompts: " + ", ".join(
            f"batch {c}: {h[f'batch{c}_prefill_s']:.1f} s" for c in THROUGHPUT_BATCHES
            if f"batch{c}_prefill_s" in h) + " (HF columns at batch > 1: decode only)")
    moe, dense = list(b["presets"])[:2] if len(b["presets"]) > 1 else (None, None)
    for c in THROUGHPUT_BATCHES if moe else ():
        m = _bench(folder, f"{moe}-throughput-{c}").get("output_tokens_per_s")
        d = _bench(folder, f"{dense}-throughput-{c}").get("output_tokens_per_s")
        if m and d:
            print(f"concurrency {c}: {moe} {m:.0f} tok/s vs {dense} {d:.0f} tok/s "
                  f"({'not slower' if m >= d else 'SLOWER'} per token)")


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "bounds":
        print(json.dumps(bounds(args), indent=1))
    elif command == "hf":
        print(json.dumps({"preset": args[0], **hf(args[0])}, indent=1))
    elif command == "report":
        report(Path(args[0]))
    else:
        sys.exit(f"unknown command {command!r}: bounds | hf | report")


if __name__ == "__main__":
    main(sys.argv[1:])
