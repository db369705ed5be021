"""DeepSeek V2 / V3 (MLA + DeepSeekMoE): greedy tokens of ModelRunner == HF transformers'
generate on tiny random checkpoints, alone, batched, with chunked prefill, and at TP=2.

What HF transformers (5.x, native `deepseek_v2` / `deepseek_v3`, no trust_remote_code) does
and we match: interleaved-pair rope on the rope dims (V2 returns the pairs interleaved, V3
de-interleaved: the same q.k), YaRN with mscale folded into cos/sin and mscale_all_dim^2
into the softmax scale, q_a/kv_a layernorms with eps 1e-6, a float32 router, V2 softmax
routing (group max), V3 sigmoid + correction bias (group top-2 sum) + renormalisation.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from appliance.model import ModelRunner
from appliance.model.layers.mla import MLAttention
from appliance.model.layers.yarn import yarn_attention_factor, yarn_config, yarn_inv_frequencies
from appliance.model.layers.moe import MoEConfig, is_moe_layer
from appliance.model.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from helpers import assert_each_prompt_alone, greedy_generate, hf_greedy, run_tp, widen_weights

PROMPTS = [[5, 9, 33, 7, 100, 21, 3], [8, 8, 8], list(range(10, 40)), [151, 2, 77, 0, 64]]
MAX_NEW = 8

YARN_V2 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
           "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}
# mscale != mscale_all_dim: cos/sin carry an attention factor != 1 as well
YARN_V3 = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
           "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 0.5}

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=2,
              num_experts_per_tok=3, first_k_dense_replace=1, n_group=4, topk_group=2,
              max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    # V2-Lite shape: no q low-rank, softmax group-limited greedy, YaRN
    "v2-noqlora": ("v2", dict(q_lora_rank=None, topk_method="group_limited_greedy",
                              routed_scaling_factor=1.0, rope_parameters=YARN_V2)),
    # V2 shape: q low-rank, attention biases (q_a, kv_a, o_proj), plain rope
    "v2-qlora": ("v2", dict(q_lora_rank=24, topk_method="group_limited_greedy",
                            routed_scaling_factor=1.5, attention_bias=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # V3 / Kimi K2.5 shape: sigmoid + e_score_correction_bias, group top-k, renormalised
    "v3": ("v3", dict(q_lora_rank=24, routed_scaling_factor=2.5, norm_topk_prob=True,
                      rope_parameters=YARN_V3, num_mtp_layers=0)),
}


def save_tiny_deepseek(folder: Path, version: str, seed: int, **over) -> Path:
    """A seeded random HF DeepSeek model (helpers.widen_weights), `save_pretrained` to folder
    (per-expert tensors)."""
    import transformers

    torch.manual_seed(seed)
    cfg_cls, model_cls = ((transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM)
                          if version == "v2" else
                          (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM))
    model = model_cls(cfg_cls(**{**COMMON, **over}))
    widen_weights(model)
    model.save_pretrained(folder)
    return folder


_CHECKPOINTS: dict[str, tuple[Path, list[list[int]]]] = {}


def built_checkpoint(name: str, tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """(folder, HF greedy tokens of PROMPTS) of CONFIGS[name], built once per session."""
    if name not in _CHECKPOINTS:
        version, over = CONFIGS[name]
        folder = save_tiny_deepseek(tmp_path_factory.mktemp(name), version, seed=11, **over)
        _CHECKPOINTS[name] = folder, hf_greedy(folder, PROMPTS, MAX_NEW)
    return _CHECKPOINTS[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return built_checkpoint(request.param, tmp_path_factory)


def test_one_at_a_time(checkpoint):
    folder, ref = checkpoint
    assert_each_prompt_alone(folder, PROMPTS, ref, MAX_NEW)


def test_batch_of_different_lengths(checkpoint):
    """All four prompts (3 to 30 tokens) prefilled in one batch, then decoded together."""
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=16)
    assert greedy_generate(runner, PROMPTS, MAX_NEW) == ref


def test_mixed_batch_chunked_prefill(checkpoint):
    """Prompts admitted one per step, prefilled in chunks of 5 over their cached prefix while
    earlier ones decode: every batch mixes mla_decode rows and mla_extend rows."""
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    assert greedy_generate(runner, PROMPTS, MAX_NEW, chunk=5, admit_per_step=1) == ref


@pytest.mark.parametrize("chunk,admit", [(None, None), (5, 1)])
def test_decompressed_prefill_matches_hf(checkpoint, chunk, admit):
    """Every prefill chunk attends decompressed (mla_prefill over the cached prefix and the
    new tokens, projected by kv_b_proj): the whole batch at once, then chunks of 5 mixed
    with decode rows (absorbed). Greedy tokens equal HF's."""
    from appliance.model.layers.mla import MLAttention
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    layers = [m for m in runner.model.modules() if isinstance(m, MLAttention)]
    assert layers
    for m in layers:
        m.decompress_min_tokens = 1
    kw = {} if chunk is None else dict(chunk=chunk, admit_per_step=admit)
    assert greedy_generate(runner, PROMPTS, MAX_NEW, **kw) == ref


def test_warm_up_writes_nothing(checkpoint):
    """The warm-up batches (chunks of 16 and 64 new tokens: absorbed; 100: decompressed;
    each also beside a decode row) leave the latent cache zero and the greedy tokens HF's."""
    folder, ref = checkpoint
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    runner.warm_up(100, 200)
    assert all(not c.any() for caches in runner.kv_caches for c in caches)
    assert greedy_generate(runner, PROMPTS, MAX_NEW) == ref


def test_decompress_rule():
    """Decompressed from DECOMPRESS_MIN_TOKENS new tokens a prefill row on average, up to
    DECOMPRESS_MAX_KEYS keys in all (host-known extend_keys, or read from the device);
    decode-only batches never."""
    from types import SimpleNamespace

    from appliance.model.batch import ForwardBatch
    from appliance.model.layers import mla

    def batch(qlens, seq_lens, num_decode, host=True):
        i32 = dict(dtype=torch.int32)
        t = sum(qlens)
        qs = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), **i32)
        keys = sum(seq_lens[num_decode:])
        return ForwardBatch(
            input_ids=torch.zeros(t, **i32), positions=torch.zeros(t, **i32), query_start=qs,
            prefix_lens=torch.zeros(len(qlens), **i32), seq_lens=torch.tensor(seq_lens, **i32),
            page_table=torch.zeros(len(qlens), 1, **i32), slot_mapping=torch.zeros(t, **i32),
            num_decode=num_decode, extend_keys_host=keys if host else None)

    layer = SimpleNamespace(decompress_min_tokens=mla.DECOMPRESS_MIN_TOKENS,
                            decompress_max_keys=mla.DECOMPRESS_MAX_KEYS)
    rule = lambda b: mla.MLAttention.decompress_extend(layer, b)  # noqa: E731
    n = mla.DECOMPRESS_MIN_TOKENS
    assert rule(batch([1, 1, n], [9, 40, 500], 2))                     # one row of n
    assert not rule(batch([1, n - 1], [9, 500], 1))                    # too few new tokens
    assert not rule(batch([n, n - 2], [n, n - 2], 0))                  # average below n
    assert rule(batch([n, n], [n, mla.DECOMPRESS_MAX_KEYS - n], 0, host=False))
    assert not rule(batch([n, n], [n, mla.DECOMPRESS_MAX_KEYS], 0))    # too many keys
    assert not rule(batch([1, 1], [5, 9], 2))                          # decodes only


@pytest.mark.slow
def test_tp2_matches_hf(tmp_path, tmp_path_factory):
    """Every config over 2 gloo ranks (one spawn): MLA heads, the dense MLP, the shared
    experts and each routed expert's intermediate dim split in two; vocab-parallel
    embedding and head. Mixed batches with chunked prefill, as test_mixed_batch_*; the first
    config once more with its prefill chunks decompressed."""
    names = sorted(CONFIGS)
    built = [built_checkpoint(n, tmp_path_factory) for n in names]
    jobs = [(str(folder), {"kv_num_pages": 64, "page_size": 4}) for folder, _ in built]
    # and the first config with every prefill chunk decompressed (kv_b_proj's local heads)
    decompressed = {"MLAttention": {"decompress_min_tokens": 1}}
    jobs.append((jobs[0][0], dict(jobs[0][1], module_attrs=decompressed)))
    results = run_tp(2, jobs, PROMPTS, MAX_NEW, tmp_path)
    for name, (_, ref), per_rank in zip(names + names[:1], built + built[:1], results):
        assert [r["tokens"] for r in per_rank] == [ref, ref], name


# --------------------------------------------------------------------------- structure
def test_latent_cache_and_layer_kinds(tmp_path):
    version, over = CONFIGS["v3"]
    folder = save_tiny_deepseek(tmp_path, version, seed=1, **{**over, "num_hidden_layers": 3})
    runner = ModelRunner(str(folder), kv_num_pages=8, page_size=4)
    model = runner.model
    assert isinstance(model, DeepseekV3ForCausalLM)
    # one cache tensor per layer: [num_slots, kv_lora_rank + qk_rope_head_dim]
    assert [tuple(t.shape) for caches in runner.kv_caches for t in caches] == [(32, 40)] * 3
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["SwiGLUMLP", "DeepseekMoE", "DeepseekMoE"]
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias is not None


def test_kv_a_bias_without_q_lora_keeps_two_projections(tmp_path):
    """q_proj never has a bias: with attention_bias and no q_lora_rank the query and latent KV
    projections stay two linears (elsewhere they are one, q_kv_a_proj), still HF's tokens."""
    version, over = CONFIGS["v2-noqlora"]
    folder = save_tiny_deepseek(tmp_path, version, seed=4, **{**over, "attention_bias": True})
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=16)
    attn = runner.model.model.layers[0].self_attn
    assert not attn.fused_x_proj and attn.kv_a_proj.bias is not None
    assert attn.q_in_proj.bias is None
    assert greedy_generate(runner, PROMPTS[:2], MAX_NEW) == hf_greedy(folder, PROMPTS[:2], MAX_NEW)


def test_bf16_model_keeps_float32_router(tmp_path):
    version, over = CONFIGS["v2-noqlora"]
    folder = save_tiny_deepseek(tmp_path, version, seed=2, **over)
    runner = ModelRunner(str(folder), dtype=torch.bfloat16, kv_num_pages=8, page_size=4)
    assert isinstance(runner.model, DeepseekV2ForCausalLM)
    moe = runner.model.model.layers[1].mlp
    assert moe.gate.weight.dtype == torch.float32 and moe.experts.w13.dtype == torch.bfloat16
    tokens = greedy_generate(runner, PROMPTS[:2], 3)
    assert all(len(t) == 3 for t in tokens)


def test_moe_layer_placement_rules():
    hf = {"n_routed_experts": 8, "first_k_dense_replace": 2, "moe_layer_freq": 2}
    assert [is_moe_layer(hf, i) for i in range(6)] == [False, False, True, False, True, False]
    assert not is_moe_layer({"n_routed_experts": 0}, 3)
    v2 = MoEConfig.from_hf({**COMMON, "topk_method": "greedy", "norm_topk_prob": True}, 2)
    assert (v2.scoring, v2.n_group, v2.renormalize, v2.correction_bias) == (
        "softmax", 1, True, False)
    v3 = MoEConfig.from_hf({**COMMON, "topk_method": "noaux_tc"}, 3)
    assert (v3.scoring, v3.n_group, v3.topk_group, v3.correction_bias) == ("sigmoid", 4, 2, True)
    with pytest.raises(ValueError, match="scoring_func"):
        MoEConfig.from_hf({**COMMON, "scoring_func": "relu"}, 3)


@pytest.mark.parametrize("params,max_pos", [
    (YARN_V2, 256), (YARN_V3, 256),
    ({**YARN_V3, "truncate": False, "beta_fast": 16}, 256),
    # DeepSeek-V2-Lite's rope_scaling, as its config.json spells it (v4 "type" key)
    ({"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}, 163840),
])
def test_yarn_matches_transformers(params, max_pos):
    """Our YaRN inverse frequencies and cos/sin factor == transformers' rope init."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_params = {**params, "rope_type": "yarn"}
    hf_params.pop("type", None)
    cfg = DeepseekV3Config(**{**COMMON, "q_lora_rank": 24, "max_position_embeddings": max_pos,
                              "rope_parameters": hf_params})
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    y = yarn_config({"max_position_embeddings": max_pos, "rope_scaling": params})
    torch.testing.assert_close(yarn_inv_frequencies(y, COMMON["qk_rope_head_dim"]), want_inv)
    assert yarn_attention_factor(y) == pytest.approx(want_factor)


def test_mla_softmax_scale_matches_transformers():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention

    from appliance.model.context import BuildContext
    from appliance.model.layers.mla import MLAConfig, mla_rotary

    hf = {**COMMON, "q_lora_rank": None, "rope_parameters": YARN_V2}
    want = DeepseekV2Attention(DeepseekV2Config(**hf), 0).scaling
    cfg = MLAConfig.from_hf(hf)
    with torch.device("meta"):
        attn = MLAttention(cfg, mla_rotary(cfg, BuildContext.single()), BuildContext.single())
    assert attn.scale == pytest.approx(want) and attn.scale != cfg.qk_head_dim ** -0.5
    assert attn.kv_cache_shapes() == ((COMMON["kv_lora_rank"] + COMMON["qk_rope_head_dim"],),)


# --------------------------------------------------------------------------- expert parallel
def ep_worker(rank: int, world: int, port: int, folder: str, out_dir: str) -> None:
    """One rank with experts split over moe_ep (`parallel.moe: ep`, EP=2, MoE TP=1): greedy
    tokens to a file."""
    import json

    import torch.distributed as dist

    from helpers import greedy_generate as generate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        runner = ModelRunner(folder, tp_rank=rank, tp_size=world, kv_num_pages=64, page_size=4,
                             moe_parallel="ep")
        moe = runner.model.model.layers[1].mlp
        tokens = generate(runner, PROMPTS, MAX_NEW, chunk=5, admit_per_step=1)
        Path(out_dir, f"ep{rank}.json").write_text(json.dumps({
            "tokens": tokens, "local_experts": moe.experts.num_local,
            "first_expert": moe.experts.first, "w13": list(moe.experts.w13.shape)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ep2_matches_hf(tmp_path, tmp_path_factory):
    """V3 with the 8 routed experts divided 4 + 4 over two ranks (each expert whole), shared
    experts split over both: the same tokens as HF."""
    import json

    import torch.multiprocessing as mp

    from helpers import free_port

    folder, ref = built_checkpoint("v3", tmp_path_factory)
    mp.spawn(ep_worker, args=(2, free_port(), str(folder), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"ep{r}.json").read_text()) for r in range(2)]
    inter, hidden = COMMON["moe_intermediate_size"], COMMON["hidden_size"]
    assert [(r["local_experts"], r["first_expert"]) for r in results] == [(4, 0), (4, 4)]
    assert results[0]["w13"] == [4, 2 * inter, hidden]
    assert [r["tokens"] for r in results] == [ref, ref]


# --------------------------------------------------------------------------- real shapes
@pytest.mark.parametrize("preset", ["deepseek-v2-lite", "kimi-k2.5"])
@pytest.mark.parametrize("world", [1, 4])
def test_real_shapes_plan_every_weight(preset, world):
    """The real configs (two layers of them) build on the meta device and the compiler's
    weight plan covers every parameter of every rank, with the checkpoint's tensor names."""
    from appliance.model.compiler import plan_weights
    from appliance.model.context import BuildContext
    from appliance.model.models import model_class
    from appliance.model.placement import ParallelLayout
    from appliance.model.presets import preset_config

    hf = preset_config(preset, num_hidden_layers=2)
    heads, inter = hf["num_attention_heads"], hf["moe_intermediate_size"]
    for rank in range(world):
        layout = ParallelLayout.tensor_parallel(rank, world)
        with torch.device("meta"):
            model = model_class(hf["architectures"])(hf, BuildContext(layout, torch.device(
                "meta"), torch.bfloat16, 64))
        plan = plan_weights(model, layout)
        attn, moe = model.model.layers[1].self_attn, model.model.layers[1].mlp
        assert attn.num_heads == heads // world
        assert tuple(moe.experts.w13.shape) == (hf["n_routed_experts"], 2 * inter // world,
                                                hf["hidden_size"])
        names = set(plan.names())
        e = hf["n_routed_experts"] - 1
        assert f"model.layers.1.mlp.experts.{e}.down_proj.weight" in names
        assert "model.layers.1.self_attn.kv_b_proj.weight" in names
        q = "q_proj" if hf["q_lora_rank"] is None else "q_b_proj"
        assert f"model.layers.0.self_attn.{q}.weight" in names
        # q_proj | q_a_proj and kv_a_proj_with_mqa are one linear: the query part split over
        # the ranks (q_a_proj: whole), the latent KV part whole on every rank
        lat_r = hf["kv_lora_rank"] + hf["qk_rope_head_dim"]
        q_out = (heads // world * (hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"])
                 if hf["q_lora_rank"] is None else hf["q_lora_rank"])
        assert attn.q_kv_a_proj.local_sizes == (q_out, lat_r)
        assert tuple(attn.q_kv_a_proj.weight.shape) == (q_out + lat_r, hf["hidden_size"])
        assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in names
        has_bias = "model.layers.1.mlp.gate.e_score_correction_bias" in names
        assert has_bias == (preset == "kimi-k2.5")


def test_v3_without_rope_interleave(tmp_path):
    """rope_interleave=False: HF rotates NeoX halves of the rope dims; so must we."""
    version, over = CONFIGS["v3"]
    folder = save_tiny_deepseek(tmp_path, version, seed=4, **{**over, "rope_interleave": False})
    runner = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    assert runner.model.model.rotary_emb.is_neox
    prompts = PROMPTS[:3]
    assert greedy_generate(runner, prompts, 6, chunk=7) == hf_greedy(folder, prompts, 6)
