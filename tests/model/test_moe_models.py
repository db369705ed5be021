"""Qwen3-MoE (Qwen3-Coder) and GLM-4.5 MoE: greedy tokens of ModelRunner == HF transformers'
generate on tiny random checkpoints (moe_checkpoints.py), alone, batched, with chunked prefill,
and over two gloo ranks with the experts split (`parallel.moe: tp`) or placed whole
(`parallel.moe: ep`); GLM's MTP layer loaded and reachable; missing or misshapen tensors named.

What HF transformers (5.x, native `qwen3_moe` / `glm4_moe`) does and we match: Qwen3-MoE's
softmax top-k (renormalised when norm_topk_prob) on the layers decoder_sparse_step /
mlp_only_layers make sparse; GLM's sigmoid + correction-bias choice, group top-k, routed
scaling and shared experts after first_k_dense_replace dense layers, NeoX rope on the first
partial_rotary_factor of each head, q/k/v bias without an o_proj bias, optional q/k norm.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from appliance.model import ModelRunner, ModelSource
from appliance.model.layers.moe import DeepseekMoE
from appliance.model.loader import LoadError
from appliance.model.models.glm4_moe import Glm4MoeForCausalLM
from appliance.model.models.qwen3_moe import Qwen3MoeForCausalLM
from helpers import greedy_generate, hf_greedy, run_tp
from moe_checkpoints import CONFIGS, MAX_NEW, PROMPTS, save_tiny_moe

_CHECKPOINTS: dict[str, tuple[Path, list[list[int]]]] = {}


def built_checkpoint(name: str, tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """(folder, HF greedy tokens of PROMPTS) of CONFIGS[name], built once per session."""
    if name not in _CHECKPOINTS:
        folder = save_tiny_moe(tmp_path_factory.mktemp(name), name)
        _CHECKPOINTS[name] = folder, hf_greedy(folder, PROMPTS, MAX_NEW)
    return _CHECKPOINTS[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return built_checkpoint(request.param, tmp_path_factory)


@pytest.mark.parametrize("way", ["alone", "batched", "chunked"])
def test_greedy_matches_hf(checkpoint, way):
    """Each prompt alone; all four (3 to 30 tokens) prefilled in one batch, then decoded
    together; or admitted one per step and prefilled in chunks of 5 over their cached prefix
    while earlier ones decode (batches mix decode rows and prefill chunks)."""
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    if way == "alone":
        assert [greedy_generate(runner, [p], MAX_NEW)[0] for p in PROMPTS] == ref
        return
    seen = []
    forward = runner.forward
    runner.forward = lambda b: seen.append(b) or forward(b)
    kw = dict(chunk=5, admit_per_step=1) if way == "chunked" else {}
    assert greedy_generate(runner, PROMPTS, MAX_NEW, **kw) == ref
    mixed = any(0 < b.num_decode < b.num_rows and int(b.prefix_lens[b.num_decode:].max()) > 0
                for b in seen)
    assert mixed == (way == "chunked")


@pytest.mark.slow
def test_tp2_tp_and_ep_match_hf(tmp_path, tmp_path_factory):
    """One spawn of two gloo ranks: a Qwen3-MoE and the grouped GLM config, each with every
    expert's intermediate dim split over the ranks (moe tp) and with four whole experts per
    rank (moe ep; GLM's shared experts then split over both). Attention heads, dense MLPs and
    the vocabulary are split either way. Mixed batches with chunked prefill."""
    names = ["qwen3-moe", "glm-4.5-grouped"]
    built = [built_checkpoint(n, tmp_path_factory) for n in names]
    jobs = [(str(folder), {"kv_num_pages": 64, "page_size": 4, "moe_parallel": moe})
            for folder, _ in built for moe in ("tp", "ep")]
    results = run_tp(2, jobs, PROMPTS, MAX_NEW, tmp_path)
    for (name, moe), per_rank in zip([(n, m) for n in names for m in ("tp", "ep")], results):
        ref = built[names.index(name)][1]
        assert [r["tokens"] for r in per_rank] == [ref, ref], (name, moe)


# --------------------------------------------------------------------------- structure
def test_qwen3_moe_layer_kinds(tmp_path_factory):
    """mlp_only_layers / decoder_sparse_step pick the dense layers; the router stays float32
    in a bf16 model; no shared expert, no correction bias; q/k norm on."""
    folder, _ = built_checkpoint("qwen3-moe-step2", tmp_path_factory)
    runner = ModelRunner(str(folder), dtype=torch.bfloat16, kv_num_pages=8, page_size=4)
    model = runner.model
    assert isinstance(model, Qwen3MoeForCausalLM)
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == [
        "SwiGLUMLP", "DeepseekMoE", "SwiGLUMLP"]
    moe = model.model.layers[1].mlp
    assert moe.gate.weight.dtype == torch.float32 and moe.experts.w13.dtype == torch.bfloat16
    assert moe.shared_experts is None and moe.gate.e_score_correction_bias is None
    assert (moe.gate.cfg.scoring, moe.gate.cfg.renormalize) == ("softmax", False)
    assert model.model.layers[0].self_attn.q_norm is not None
    folder, _ = built_checkpoint("qwen3-moe", tmp_path_factory)
    kinds = [type(layer.mlp).__name__ for layer in
             ModelRunner(str(folder), kv_num_pages=8).model.model.layers]
    assert kinds == ["DeepseekMoE", "SwiGLUMLP", "DeepseekMoE"]


def test_glm4_moe_layer_kinds(tmp_path_factory):
    """first_k_dense_replace dense layers, then MoE with shared experts and the correction
    bias; rope on partial_rotary_factor of the head; o_proj without bias; q/k norm per
    use_qk_norm; a checkpoint without MTP tensors (saved by transformers) builds no MTP layer."""
    folder, _ = built_checkpoint("glm-4.5-grouped", tmp_path_factory)
    model = ModelRunner(str(folder), kv_num_pages=8).model
    assert isinstance(model, Glm4MoeForCausalLM)
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == [
        "SwiGLUMLP", "SwiGLUMLP", "DeepseekMoE"]
    moe = model.model.layers[2].mlp
    assert moe.shared_experts is not None and moe.gate.e_score_correction_bias is not None
    cfg = moe.gate.cfg
    assert (cfg.scoring, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == (
        "sigmoid", 4, 2, 2.5)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert attn.q_norm is not None and model.model.rotary_emb.rotary_dim == 32 // 4
    assert len(model.mtp_layers) == 0
    folder, _ = built_checkpoint("glm-4.5-air", tmp_path_factory)
    model = ModelRunner(str(folder), kv_num_pages=8).model
    assert model.model.layers[0].self_attn.q_norm is None
    assert model.model.rotary_emb.rotary_dim == 32 // 2


def test_config_rules():
    """A GLM config without partial_rotary_factor rotates half of each head, as HF does (and
    YaRN, which rotates whole heads, is refused then); Qwen3-MoE refuses a sliding window."""
    hf = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
          "num_attention_heads": 4, "head_dim": 32, "attention_bias": True}
    cfg = Glm4MoeForCausalLM.read_config(hf)
    assert cfg.rope.partial_rotary_factor == 0.5 and cfg.qkv_bias and not cfg.o_bias
    assert not cfg.qk_norm
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(ValueError, match="YaRN"):
        Glm4MoeForCausalLM.read_config({**hf, "rope_scaling": yarn})
    assert Qwen3MoeForCausalLM.read_config({**hf, "sliding_window": 4096}).qk_norm
    with pytest.raises(ValueError, match="use_sliding_window"):
        Qwen3MoeForCausalLM.read_config({**hf, "use_sliding_window": True,
                                         "sliding_window": 4096})


def _with_mtp_layer(src: Path, dst: Path, drop: str | None = None) -> dict[str, torch.Tensor]:
    """src's checkpoint plus an MTP layer model.layers.3.* (layer 2's block, new enorm, hnorm,
    eh_proj, shared_head.norm; GLM-4.5's copies of embed_tokens and shared_head.head),
    without tensor `drop`. Returns the MTP tensors."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    h = tensors["model.norm.weight"].shape[0]
    gen = torch.Generator().manual_seed(5)
    mtp = {k.replace("model.layers.2.", "model.layers.3."): v.clone()
           for k, v in tensors.items() if k.startswith("model.layers.2.")}
    mtp.update({f"model.layers.3.{n}.weight": torch.rand(h, generator=gen) + 0.5
                for n in ("enorm", "hnorm", "shared_head.norm")})
    mtp["model.layers.3.eh_proj.weight"] = torch.randn(h, 2 * h, generator=gen)
    mtp["model.layers.3.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp["model.layers.3.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    tensors.update(mtp)
    if drop is not None:
        tensors.pop(drop)
    save_file(tensors, dst / "model.safetensors")
    return mtp


def test_glm_mtp_layer_is_loaded_and_leaves_the_target_alone(tmp_path, tmp_path_factory):
    """A checkpoint with the MTP layer (num_nextn_predict_layers: 1) loads it into
    model.mtp_layers[0] (every tensor from model.layers.3.*, the routed experts stacked), gives
    its attention a KV cache, and leaves the greedy tokens HF's. One of its tensors missing:
    start-up fails naming it."""
    folder, ref = built_checkpoint("glm-4.5-air", tmp_path_factory)
    mtp = _with_mtp_layer(folder, tmp_path / "mtp")
    runner = ModelRunner(str(tmp_path / "mtp"), kv_num_pages=64, page_size=4)
    layer = runner.model.mtp_layers[0]
    assert torch.equal(layer.eh_proj.weight, mtp["model.layers.3.eh_proj.weight"])
    assert torch.equal(layer.shared_head.norm.weight, mtp["model.layers.3.shared_head.norm.weight"])
    assert isinstance(layer.mlp, DeepseekMoE)
    e5 = "model.layers.3.mlp.experts.5."
    assert torch.equal(layer.mlp.experts.w13[5], torch.cat([mtp[e5 + "gate_proj.weight"],
                                                           mtp[e5 + "up_proj.weight"]]))
    assert torch.equal(layer.mlp.gate.e_score_correction_bias,
                       mtp["model.layers.3.mlp.gate.e_score_correction_bias"])
    assert len(runner.kv_caches) == 3 + 1
    assert greedy_generate(runner, PROMPTS, MAX_NEW, chunk=5, admit_per_step=1) == ref
    _with_mtp_layer(folder, tmp_path / "bad", drop="model.layers.3.hnorm.weight")
    with pytest.raises(LoadError, match=r"lacks tensor\(s\) model\.layers\.3\.hnorm\.weight"):
        ModelRunner(str(tmp_path / "bad"), kv_num_pages=8)


# --------------------------------------------------------------------------- bad checkpoints
def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("name,tensor", [
    ("qwen3-moe", "model.layers.2.mlp.experts.5.up_proj.weight"),
    ("qwen3-moe", "model.layers.0.self_attn.k_norm.weight"),
    ("glm-4.5-air", "model.layers.1.mlp.gate.e_score_correction_bias"),
    ("glm-4.5-air", "model.layers.2.mlp.shared_experts.down_proj.weight"),
])
def test_missing_tensor_is_named(name, tensor, tmp_path, tmp_path_factory):
    folder, _ = built_checkpoint(name, tmp_path_factory)
    bad = _rewrite(folder, tmp_path / "bad", lambda t: t.pop(tensor))
    with pytest.raises(LoadError, match=rf"lacks tensor\(s\) {tensor.replace('.', '[.]')}"):
        ModelRunner(str(bad), kv_num_pages=8)


@pytest.mark.parametrize("name,tensor", [
    ("qwen3-moe", "model.layers.0.mlp.gate.weight"),            # [E, H] -> [H, E]
    ("glm-4.5-air", "model.layers.1.mlp.experts.3.down_proj.weight"),
])
def test_misshapen_tensor_is_named(name, tensor, tmp_path, tmp_path_factory):
    folder, _ = built_checkpoint(name, tmp_path_factory)

    def transpose(t):
        t[tensor] = t[tensor].T.contiguous()

    bad = _rewrite(folder, tmp_path / "bad", transpose)
    with pytest.raises(LoadError, match=rf"tensor {tensor.replace('.', '[.]')} has shape"):
        ModelRunner(str(bad), kv_num_pages=8)


def test_ep_needs_experts_divisible_by_ranks():
    """moe ep over 3 ranks of a model with 8 experts: a build error naming n_routed_experts
    (meta device: no weights)."""
    from appliance.model.context import BuildContext
    from appliance.model.runner import moe_layout

    hf = {**CONFIGS["qwen3-moe"][1], "architectures": ["Qwen3MoeForCausalLM"],
          "vocab_size": 160, "hidden_size": 64, "intermediate_size": 96,
          "moe_intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 6,
          "num_key_value_heads": 3}
    ctx = BuildContext(moe_layout(0, 3, "ep"), torch.device("meta"), torch.float32, 16)
    with torch.device("meta"), pytest.raises(ValueError, match="n_routed_experts"):
        Qwen3MoeForCausalLM(hf, ctx)
    with pytest.raises(ValueError, match="parallel.moe"):
        moe_layout(0, 2, "dp")


# --------------------------------------------------------------------------- real shapes
@pytest.mark.parametrize("preset", ["qwen3-coder-30b-a3b", "qwen3-coder-480b", "glm-4.5-air"])
@pytest.mark.parametrize("world,moe", [(1, "tp"), (8, "tp"), (8, "ep")])
def test_real_shapes_plan_every_weight(preset, world, moe):
    """The published configs (two layers of them) build on the meta device for every rank of
    TP8 (experts split or whole) and the weight plan covers every parameter with the
    checkpoint's tensor names (GLM's MTP layer as model.layers.2.*)."""
    from appliance.model.compiler import plan_weights
    from appliance.model.context import BuildContext
    from appliance.model.models import model_class
    from appliance.model.presets import preset_config
    from appliance.model.runner import moe_layout

    hf = preset_config(preset, num_hidden_layers=2)
    experts = hf.get("num_experts") or hf["n_routed_experts"]
    inter, hidden = hf["moe_intermediate_size"], hf["hidden_size"]
    for rank in range(world):
        layout = moe_layout(rank, world, moe)
        with torch.device("meta"):
            model = model_class(hf["architectures"])(hf, BuildContext(
                layout, torch.device("meta"), torch.bfloat16, 16))
        names = set(plan_weights(model, layout).names())
        experts_here = model.model.layers[1].mlp.experts
        local = (experts, 2 * inter // world) if moe == "tp" else (experts // world, 2 * inter)
        assert tuple(experts_here.w13.shape) == (*local, hidden)
        last = f"model.layers.1.mlp.experts.{experts_here.first + experts_here.num_local - 1}"
        assert f"{last}.down_proj.weight" in names
        assert ("model.layers.2.eh_proj.weight" in names) == (preset == "glm-4.5-air")
        assert "model.layers.1.mlp.gate.weight" in names


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen3-coder-30b-a3b", "glm-4.5-air"])
def test_dummy_preset_real_width(preset):
    """Each preset at full width, dummy weights, bf16: it builds, loads and decodes. For speed
    one MoE layer (GLM: after its dense layer; no MTP layer), 16 of the experts and a
    4096-token vocabulary; every dim is the preset's own."""
    from appliance.model.presets import preset_config

    glm = preset == "glm-4.5-air"
    over = (dict(num_hidden_layers=2, n_routed_experts=16, num_nextn_predict_layers=0) if glm
            else dict(num_hidden_layers=1, num_experts=16))
    cfg = preset_config(preset, vocab_size=4096, **over)
    runner = ModelRunner(ModelSource(load_format="dummy", hf_config=cfg, seed=3),
                         dtype=torch.bfloat16, kv_num_pages=4, page_size=16)
    moe = runner.model.model.layers[-1].mlp
    assert isinstance(moe, DeepseekMoE)
    assert tuple(moe.experts.w2.shape) == (16, cfg["hidden_size"], cfg["moe_intermediate_size"])
    tokens, = greedy_generate(runner, [[1, 2, 3, 4, 5]], 3)
    assert len(tokens) == 3 and all(0 <= t < 4096 for t in tokens)
