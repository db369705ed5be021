"""GPT-OSS (GptOssForCausalLM) on tiny random checkpoints saved by HF transformers: greedy
tokens == transformers' `generate` alone, batched, with chunked prefill and with contexts
several windows long (the sliding layers' slots before the window poisoned with NaN), TP2 ==
TP1 over gloo, MXFP4 expert tensors, bad checkpoints named, the presets at real width."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from appliance.model import ModelRunner, ModelSource
from appliance.model.layers.attention import PagedAttention
from appliance.model.loader import LoadError
from appliance.model.presets import PRESETS, preset_config
from helpers import assert_each_prompt_alone, greedy_generate, hf_greedy, run_tp

WINDOW = 6
PROMPTS = [[5, 9, 33, 7, 100, 21, 3], [8, 8, 8], list(range(10, 40)), [151, 2, 77, 0, 64]]
MAX_NEW = 8


def gpt_oss_config(**over):
    import transformers

    cfg = dict(vocab_size=160, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
               num_experts_per_tok=2, sliding_window=WINDOW, max_position_embeddings=256,
               rms_norm_eps=1e-5, initializer_range=0.1, swiglu_limit=1.0,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                "original_max_position_embeddings": 64},
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.GptOssConfig(**{**cfg, **over})


def save_gpt_oss(folder, seed: int = 0, **over):
    """A seeded random GptOssForCausalLM saved with save_pretrained. swiglu_limit 1 (HF's is
    7) so that the clamps bind at this init's activation scale."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(gpt_oss_config(**over),
                                                          dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = save_gpt_oss(tmp_path_factory.mktemp("gpt_oss"), seed=3)
    return folder, hf_greedy(folder, PROMPTS, MAX_NEW)


def test_one_at_a_time(checkpoint):
    folder, ref = checkpoint
    assert_each_prompt_alone(folder, PROMPTS, ref, MAX_NEW)


def test_batched_prefill_then_decode(checkpoint):
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=16)
    assert greedy_generate(runner, PROMPTS, MAX_NEW) == ref


def _poison_outside_windows(runner: ModelRunner) -> list[int]:
    """Before each step, every sliding layer's K/V slots of the positions no query of the
    step can see (before each row's first query position - window + 1) become NaN. Returns a
    list that counts the poisoned slots."""
    sliding = [m for m in runner.model.modules() if isinstance(m, PagedAttention) and m.window]
    assert len(sliding) == 2
    poisoned, forward, ps = [0], runner.forward, runner.page_size

    def poisoning_forward(batch):
        for b in range(batch.num_rows):
            stale = int(batch.prefix_lens[b]) - WINDOW + 1
            if stale > 0:
                pos = torch.arange(stale)
                slots = batch.page_table[b].long()[pos // ps] * ps + pos % ps
                for layer in sliding:
                    layer.k_cache[slots] = float("nan")
                    layer.v_cache[slots] = float("nan")
                poisoned[0] += stale
        return forward(batch)

    runner.forward = poisoning_forward
    return poisoned


def test_mixed_chunked_prefill_beyond_the_window(checkpoint):
    """All prompts in flight together, later ones prefilled in chunks of 5 while earlier
    ones decode; contexts run to 38 tokens against a window of 6. The sliding layers' slots
    outside every window are NaN, so the model reads only the last `window` positions."""
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    poisoned = _poison_outside_windows(runner)
    assert greedy_generate(runner, PROMPTS, MAX_NEW, chunk=5, admit_per_step=1) == ref
    assert poisoned[0] > 100


def test_window_and_sinks_matter(checkpoint):
    """Control: the same checkpoint without windows, or with sinks at -inf, generates other
    tokens, so the equality tests above depend on both."""
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    layers = [m for m in runner.model.modules() if isinstance(m, PagedAttention)]
    for layer in layers:
        layer.window = 0
    assert greedy_generate(runner, PROMPTS[2:3], MAX_NEW) != ref[2:3]
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    for layer in runner.model.modules():
        if isinstance(layer, PagedAttention):
            layer.sinks.data.fill_(-1e30)
    assert greedy_generate(runner, PROMPTS, MAX_NEW) != ref


@pytest.mark.slow
def test_tp2_equals_tp1(checkpoint, tmp_path):
    """Heads and sinks split over 2 gloo ranks, the experts' intermediate dim split (parallel.moe
    tp) or 2 whole experts a rank (ep, biases added by their expert's rank only)."""
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    want = greedy_generate(runner, PROMPTS, MAX_NEW, chunk=5, admit_per_step=1)
    assert want == ref
    jobs = [(str(folder), dict(kv_num_pages=64, page_size=4, moe_parallel=moe))
            for moe in ("tp", "ep")]
    for per_rank in run_tp(2, jobs, PROMPTS, MAX_NEW, tmp_path):
        assert [r["tokens"] for r in per_rank] == [ref, ref]


def _rewrite(src, dst, edit, config_edit=None) -> None:
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config_edit(cfg) if config_edit else cfg))


def test_missing_or_misshapen_tensor_is_named(checkpoint, tmp_path):
    folder, _ = checkpoint
    sinks = "model.layers.1.self_attn.sinks"
    _rewrite(folder, tmp_path / "missing", lambda t: t.pop(sinks))
    with pytest.raises(LoadError, match=sinks.replace(".", r"\.")):
        ModelRunner(str(tmp_path / "missing"), kv_num_pages=8, page_size=4)
    experts = "model.layers.2.mlp.experts.gate_up_proj"

    def misshape(t):
        t[experts] = t[experts][:, :, :-2].contiguous()
    _rewrite(folder, tmp_path / "shape", misshape)
    with pytest.raises(LoadError, match=rf"{experts.replace('.', '[.]')} has shape \(4, 64, 62\)"):
        ModelRunner(str(tmp_path / "shape"), kv_num_pages=8, page_size=4)


# --------------------------------------------------------------------------- MXFP4
def _random_mxfp4(gen, *lead_out_groups):
    """Random MXFP4 blocks [..., G, 16] and scales [..., G] near 2^-2 (weights ~ +-1)."""
    blocks = torch.randint(0, 256, (*lead_out_groups, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(123, 127, lead_out_groups, dtype=torch.uint8, generator=gen)
    return blocks, scales


def test_mxfp4_dequantize_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from kernels import mxfp4
    gen = torch.Generator().manual_seed(0)
    blocks, scales = _random_mxfp4(gen, 3, 5, 4)
    scales[0, 0, 0], scales[1, 2, 3] = 0, 255        # the scale range's ends
    for dtype in (torch.float32, torch.bfloat16):
        want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)       # [3, 128, 5]
        got = mxfp4.dequantize(blocks, scales, dtype)                        # [3, 5, 128]
        assert got.dtype == dtype and torch.equal(got.transpose(1, 2), want)


@pytest.fixture(scope="module")
def mxfp4_checkpoint(checkpoint, tmp_path_factory):
    """The tiny checkpoint with MXFP4 experts (`*_blocks` / `*_scales`, quant_method mxfp4),
    and its twin holding the same experts dequantized by transformers: (folder, transformers'
    greedy tokens on the twin, the twin's expert tensors)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder, _ = checkpoint
    out = tmp_path_factory.mktemp("mxfp4")
    gen = torch.Generator().manual_seed(1)
    packed, plain = {}, {}
    for layer in range(4):
        for proj, rows, inn in (("gate_up_proj", 64, 64), ("down_proj", 64, 32)):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            blocks, scales = _random_mxfp4(gen, 4, rows, inn // 32)
            packed[name] = (blocks, scales)
            plain[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)

    def to_packed(t):
        for name, (blocks, scales) in packed.items():
            del t[name]
            t[name + "_blocks"], t[name + "_scales"] = blocks, scales

    def quantized(cfg):
        return {**cfg, "quantization_config": {"quant_method": "mxfp4"}}
    _rewrite(folder, out / "mxfp4", to_packed, quantized)
    _rewrite(folder, out / "twin", lambda t: t.update(plain))
    return out / "mxfp4", hf_greedy(out / "twin", PROMPTS, MAX_NEW), plain


def test_mxfp4_checkpoint_dequantized_at_load(mxfp4_checkpoint):
    """On CPU only the torch reference reads MXFP4 experts: they are dequantized as they
    load, and the model generates transformers' tokens of the dequantized twin."""
    folder, ref, plain = mxfp4_checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    experts = runner.model.model.layers[3].mlp.experts
    assert not experts.packed
    assert torch.equal(experts.down_proj, plain["model.layers.3.mlp.experts.down_proj"])
    assert greedy_generate(runner, PROMPTS, MAX_NEW) == ref


@pytest.fixture
def packed_backend():
    """A non-reference `fused_moe_mxfp4` on CPU (the reference under another name), so the
    model keeps MXFP4 experts packed as it does where the Triton kernel serves them."""
    import kernels
    from kernels import reference as R

    kernels.register("fused_moe_mxfp4", backend="packed-test", priority=5)(R.fused_moe_mxfp4)
    yield
    kernels.unregister("fused_moe_mxfp4", "packed-test")


def test_mxfp4_checkpoint_kept_packed(mxfp4_checkpoint, packed_backend):
    folder, ref, _ = mxfp4_checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    experts = runner.model.model.layers[0].mlp.experts
    assert experts.packed and experts.gate_up_proj_blocks.dtype == torch.uint8
    assert experts.gate_up_proj_blocks.shape == (4, 64, 2, 16)
    assert greedy_generate(runner, PROMPTS, MAX_NEW, chunk=5, admit_per_step=1) == ref


def test_mxfp4_packed_shards_whole_groups(packed_backend):
    """TP2 plan of packed experts: rank 1 holds the second half of the gate/up rows (pairs
    kept) and of the down projection's 32-element groups; a split that would cut a group is
    refused by name."""
    from appliance.model.compiler import plan_weights
    from appliance.model.context import BuildContext
    from appliance.model.layers.gpt_oss_moe import GptOssExperts, GptOssMoEConfig
    from appliance.model.placement import ParallelLayout

    hf = {"hidden_size": 64, "intermediate_size": 128, "num_local_experts": 4,
          "num_experts_per_tok": 2, "quantization_config": {"quant_method": "mxfp4"}}
    ctx = BuildContext(ParallelLayout.tensor_parallel(1, 2), torch.device("cpu"),
                       torch.float32, 16)
    with torch.device("meta"):
        model = torch.nn.ModuleDict({"experts": GptOssExperts(GptOssMoEConfig.from_hf(hf), ctx)})
    plan = plan_weights(model, ctx.layout)
    (down,) = plan.slices["experts.down_proj_blocks"]
    assert (down.src_dim, down.src_start, down.length) == (2, 2, 2)     # groups 2..3 of 4
    (gate_up,) = plan.slices["experts.gate_up_proj_scales"]
    assert (gate_up.src_dim, gate_up.src_start, gate_up.length) == (1, 128, 128)
    ctx4 = BuildContext(ParallelLayout.tensor_parallel(0, 4), torch.device("cpu"),
                        torch.float32, 16)
    with pytest.raises(ValueError, match="intermediate_size 96 over moe_tp 4 leaves 24"):
        GptOssExperts(GptOssMoEConfig.from_hf({**hf, "intermediate_size": 96}), ctx4)


def test_other_quantized_checkpoints_are_still_refused(checkpoint, tmp_path):
    folder, _ = checkpoint
    _rewrite(folder, tmp_path / "fp8", lambda t: None,
             lambda c: {**c, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(LoadError, match="quant_method = 'fp8'"):
        ModelRunner(str(tmp_path / "fp8"), kv_num_pages=8, page_size=4)


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", ["gpt-oss-20b", "gpt-oss-120b"])
def test_presets_are_the_published_shapes(preset):
    cfg = PRESETS[preset]
    experts = {"gpt-oss-20b": (24, 32), "gpt-oss-120b": (36, 128)}[preset]
    assert (cfg["num_hidden_layers"], cfg["num_local_experts"]) == experts
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_experts_per_tok"],
            cfg["sliding_window"], cfg["vocab_size"]) == (2880, 2880, 64, 8, 64, 4, 128, 201088)
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * (experts[0] // 2)


def test_preset_real_width_dummy():
    """gpt-oss-20b's attention and expert shapes at full width. For speed: 2 layers (sliding,
    full), 4 experts, a 4096-token vocabulary."""
    cfg = preset_config("gpt-oss-20b", num_hidden_layers=2, num_local_experts=4,
                        vocab_size=4096, layer_types=["sliding_attention", "full_attention"])
    src = ModelSource(load_format="dummy", hf_config=cfg, seed=3)
    runner = ModelRunner(src, dtype=torch.bfloat16, kv_num_pages=4, page_size=16)
    layer = runner.model.model.layers[0]
    assert [m.self_attn.attn.window for m in runner.model.model.layers] == [128, 0]
    assert layer.self_attn.attn.sinks.shape == (64,)
    assert layer.mlp.experts.gate_up_proj.shape == (4, 2880, 5760)
    assert runner.max_model_len == 131072
    tokens, = greedy_generate(runner, [[1, 2, 3, 4, 5]], 3)
    assert len(tokens) == 3 and all(0 <= t < 4096 for t in tokens)


@pytest.mark.slow
def test_mxfp4_preset_real_width_dummy(packed_backend):
    """gpt-oss-20b-mxfp4's experts at full width kept packed, dummy codes and scales (2
    layers, 4 experts, a 4096-token vocabulary, for speed)."""
    cfg = preset_config("gpt-oss-20b-mxfp4", num_hidden_layers=2, num_local_experts=4,
                        vocab_size=4096, layer_types=["sliding_attention", "full_attention"])
    runner = ModelRunner(ModelSource(load_format="dummy", hf_config=cfg, seed=3),
                         dtype=torch.bfloat16, kv_num_pages=4, page_size=16)
    experts = runner.model.model.layers[1].mlp.experts
    assert experts.gate_up_proj_blocks.shape == (4, 5760, 90, 16)
    assert experts.down_proj_scales.shape == (4, 2880, 90)
    assert experts.gate_up_proj_blocks.float().std() > 50          # random codes
    assert bool((experts.down_proj_scales == 120).all())           # 2^-7
    tokens, = greedy_generate(runner, [[1, 2, 3, 4, 5]], 2)
    assert len(tokens) == 2 and all(0 <= t < 4096 for t in tokens)
