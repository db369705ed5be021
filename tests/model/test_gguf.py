"""GGUF checkpoints: metadata and tensor names mapped to our models (== transformers loading the
same file), every dequantized type == gguf's reference dequantization, TP=2 == TP=1, and
clear errors for what we do not read. The files are written in the tests (gguf_files.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from appliance.model import ModelRunner
from appliance.model.gguf_files import (find_gguf, gguf_tensors, hf_tensor_name,
                                        read_gguf_config, write_tensor_index)
from appliance.model.loader import LoadError
from gguf_files import Q, encode, gguf_name, write_gguf
from helpers import greedy_generate, run_tp, tiny_hf_config

PROMPTS = [[5, 9, 33, 7, 100, 21, 3], [8, 8, 8], list(range(10, 40))]
MAX_NEW = 6
THETA = 10000.0
FAMILIES = {
    # transformers reads no head_dim from a qwen3 GGUF and takes Qwen3Config's 128, so the
    # qwen3 model has head_dim 128 (!= hidden / heads, which our side reads from key_length)
    "llama": {"rope_parameters": {"rope_type": "default", "rope_theta": THETA}},
    "qwen2": {},
    "qwen3": {"head_dim": 128},
}


def _hf_model(family: str, seed: int, **over):
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **{**FAMILIES[family], **over})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model, {**cfg.to_dict(), "rope_theta": THETA}


def _state_dict(model, tied: bool) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")}


def _last_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    seen = []
    forward = runner.forward
    runner.forward = lambda b: seen.append(forward(b)) or seen[-1]
    greedy_generate(runner, [prompt], 1)
    runner.forward = forward
    return seen[0][0]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict:
    """family -> a Q8_0 GGUF of a tiny random model (qwen3 with tied embeddings)."""
    out = {}
    for family in FAMILIES:
        tied = family == "qwen3"
        model, cfg = _hf_model(family, seed=11, tie_word_embeddings=tied)
        folder = tmp_path_factory.mktemp(f"gguf_{family}")
        out[family] = write_gguf(folder / f"{family}.gguf", family, cfg,
                                 _state_dict(model, tied), Q.Q8_0)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_and_greedy_match_transformers(ggufs, family):
    """transformers loads the same GGUF (`gguf_file=`, dequantized with gguf too): the
    mapped config has its shape, and logits and greedy tokens agree."""
    import transformers

    path = ggufs[family]
    ours = read_gguf_config(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    assert ours["architectures"] == [arch[family]] and ours["model_type"] == family
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings"):
        assert ours[key] == getattr(ref.config, key), key
    assert ours["head_dim"] == getattr(ref.config, "head_dim", 16)
    assert ours["rms_norm_eps"] == pytest.approx(ref.config.rms_norm_eps)
    runner = ModelRunner(str(path), kv_num_pages=64, page_size=4)
    for prompt in PROMPTS:
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(_last_logits(runner, prompt), want, atol=1e-4, rtol=1e-4)
        g = ref.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                         do_sample=False, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
        assert greedy_generate(runner, [prompt], MAX_NEW) == [g[0, len(prompt):].tolist()]


def test_tp2_matches_tp1(ggufs, tmp_path):
    """Sharded loading: column shards read only their rows, row shards narrow the dequantized
    tensor, llama's permuted q/k are undone before the split. One spawn for all families."""
    kv = dict(kv_num_pages=64, page_size=4)
    jobs = [(str(path), kv) for path in ggufs.values()]
    refs = [greedy_generate(ModelRunner(path, **kv), PROMPTS, MAX_NEW, chunk=5,
                            admit_per_step=1) for path, _ in jobs]
    for ref, ranks in zip(refs, run_tp(2, jobs, PROMPTS, MAX_NEW, tmp_path)):
        assert [r["tokens"] for r in ranks] == [ref, ref]


# Row length 256 (one K-quant super-block); these types gguf can only dequantize, so their
# blocks are random bytes with sane float16 scales at each type's scale offsets.
K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                   Q.Q6_K: (208,)}
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, *K_SCALE_OFFSETS]


def _random_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in K_SCALE_OFFSETS[qtype]:
        scale = rng.uniform(0.001, 0.02, size=(rows, cols // block)).astype(np.float16)
        data[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_every_type_loads_as_the_reference_dequantization(qtype, tmp_path):
    """All 2-D weights of a one-layer Qwen2 (no q/k permutation) in `qtype`, loaded at TP=1:
    every parameter equals gguf.quants.dequantize of its tensor, and, where gguf can quantize,
    stays within the type's rounding of the original."""
    model, cfg = _hf_model("qwen2", seed=2, hidden_size=256, intermediate_size=256,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    sd = _state_dict(model, tied=False)
    rng = np.random.default_rng(0)
    raw = {name: (_random_blocks(qtype, t.shape[0], t.shape[1], rng), qtype)
           for name, t in sd.items() if t.ndim == 2 and qtype in K_SCALE_OFFSETS}
    path = write_gguf(tmp_path / "m.gguf", "qwen2", cfg, sd, qtype, raw=raw)
    reader = GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    assert {stored[gguf_name(n)].tensor_type for n, t in sd.items() if t.ndim == 2} == {qtype}
    want = {n: torch.from_numpy(np.array(dequantize(stored[gguf_name(n)].data,
                                                    stored[gguf_name(n)].tensor_type)))
            .reshape(t.shape).float() for n, t in sd.items()}
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    write_tensor_index(path, prepared)
    for t in gguf_tensors(path, prepared):   # the index maps what the parse gives
        ref = stored[t.name]
        assert (t.tensor_type, t.shape) == (ref.tensor_type, tuple(int(d) for d in ref.shape))
        assert t.data.dtype == ref.data.dtype and np.array_equal(t.data, ref.data)
    runner = ModelRunner(str(path), kv_num_pages=4, page_size=4)
    layer = runner.model.model.layers[0]
    pre = "model.layers.0."
    qkv = torch.cat([want[pre + f"self_attn.{p}_proj.weight"] for p in "qkv"])
    gate_up = torch.cat([want[pre + "mlp.gate_proj.weight"], want[pre + "mlp.up_proj.weight"]])
    assert torch.equal(layer.self_attn.qkv_proj.weight, qkv)
    assert torch.equal(layer.self_attn.o_proj.weight, want[pre + "self_attn.o_proj.weight"])
    assert torch.equal(layer.mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(layer.mlp.down_proj.weight, want[pre + "mlp.down_proj.weight"])
    embed = runner.model.model.embed_tokens.weight
    assert torch.equal(embed[: cfg["vocab_size"]], want["model.embed_tokens.weight"])
    if qtype not in K_SCALE_OFFSETS:
        # the worst rounding error of each type, relative to the largest value: half a step;
        # Q4_0/Q5_0 put a block's largest magnitude at -8/-16, so the other sign's end is
        # clipped by up to one step
        worst = {Q.F32: 0, Q.F16: 2 ** -11, Q.BF16: 2 ** -8, Q.Q8_0: 1 / 254, Q.Q5_0: 1 / 16,
                 Q.Q5_1: 1 / 31, Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 15}[qtype]
        original = sd[pre + "mlp.down_proj.weight"]
        error = (layer.mlp.down_proj.weight - original).abs().max()
        assert error <= worst * original.abs().max() * 1.001
    assert torch.isfinite(_last_logits(runner, PROMPTS[0])).all()


def test_tensor_names():
    assert hf_tensor_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.12.attn_k_norm.weight") == "model.layers.12.self_attn.k_norm.weight"
    assert hf_tensor_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("rope_freqs.weight") is None
    assert hf_tensor_name("blk.0.ffn_gate_exps.weight") is None


def test_llama3_rope_from_rope_freqs(tmp_path):
    """llama.cpp stores Llama-3.1 rope scaling as per-frequency divisors (rope_freqs); the
    config gets HF's llama3 rope_scaling back, checked against transformers' llama3 rope."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model, cfg = _hf_model("llama", seed=1, max_position_embeddings=1024)
    rope = {"rope_type": "llama3", "rope_theta": THETA, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=rope,
                     max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / THETA ** (torch.arange(0, 16, 2).float() / 16)
    divisors = (plain / scaled).numpy().astype(np.float32)
    assert divisors.max() == pytest.approx(8.0) and divisors.min() == pytest.approx(1.0)
    sd = _state_dict(model, tied=False)
    raw = {"rope_freqs.weight": (divisors, Q.F32)}
    path = write_gguf(tmp_path / "l3.gguf", "llama", cfg, {**sd, "rope_freqs.weight": None},
                      raw=raw)
    got = read_gguf_config(path)["rope_scaling"]
    assert got == {"rope_type": "llama3", "factor": pytest.approx(8.0), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    ModelRunner(str(path), kv_num_pages=4, page_size=4)         # builds with that rope
    raw["rope_freqs.weight"] = (divisors[::-1].copy(), Q.F32)     # not the llama3 formula
    path = write_gguf(tmp_path / "odd.gguf", "llama", cfg, {**sd, "rope_freqs.weight": None},
                      raw=raw)
    with pytest.raises(LoadError, match="rope_freqs"):
        read_gguf_config(path)


def test_unsupported_architecture_and_type_are_named(tmp_path):
    model, cfg = _hf_model("qwen2", seed=3)
    sd = _state_dict(model, tied=False)
    path = write_gguf(tmp_path / "phi.gguf", "phi3", cfg, sd)
    with pytest.raises(LoadError, match="GGUF architecture 'phi3' is not supported"):
        read_gguf_config(path)
    name = "model.layers.0.mlp.down_proj.weight"
    rows = sd[name].shape[0]
    odd = {name: (np.zeros((rows, 66), np.uint8), Q.IQ2_XXS)}   # one 256-value block a row
    path = write_gguf(tmp_path / "iq.gguf", "qwen2", cfg, sd, raw=odd)
    with pytest.raises(LoadError, match=r"IQ2_XXS \(e\.g\. blk\.0\.ffn_down\.weight\)"):
        read_gguf_config(path)


def test_find_gguf(tmp_path):
    model, cfg = _hf_model("qwen2", seed=4)
    path = write_gguf(tmp_path / "a.gguf", "qwen2", cfg, _state_dict(model, tied=False))
    assert find_gguf(path) == path and find_gguf(tmp_path) == path
    (tmp_path / "b.gguf").write_bytes(path.read_bytes())
    with pytest.raises(LoadError, match="several GGUF files"):
        find_gguf(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf(tmp_path) is None                      # an HF folder
    (tmp_path / "bad.gguf").write_bytes(b"not gguf")
    with pytest.raises(LoadError, match="not a readable GGUF file"):
        read_gguf_config(tmp_path / "bad.gguf")


@pytest.mark.parametrize("size", [4, 24, 3000])
def test_a_truncated_gguf_is_a_load_error_naming_it(tmp_path, size):
    """QA: a GGUF cut to 4 or 24 bytes made the reader raise IndexError, which reached the
    tokenizer cache's builder and was reported as a cache that cannot be written."""
    from appliance.model.gguf_tokenizer import ensure_gguf_tokenizer

    model, cfg = _hf_model("qwen2", seed=4)
    whole = write_gguf(tmp_path / "whole.gguf", "qwen2", cfg, _state_dict(model, tied=False))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:size])
    with pytest.raises(LoadError, match=rf"cut.gguf: not a readable GGUF file \({size:,} bytes"):
        ensure_gguf_tokenizer(cut, tmp_path / "cache")


def test_runner_reads_a_folder_holding_one_gguf(ggufs, tmp_path):
    path = ggufs["llama"]
    (tmp_path / path.name).symlink_to(path)
    runner = ModelRunner(str(tmp_path), kv_num_pages=8, page_size=4)
    assert runner.eos_token_ids == [] and runner.vocab_size == 160
    assert greedy_generate(runner, PROMPTS[:1], 3) == greedy_generate(
        ModelRunner(str(path), kv_num_pages=8, page_size=4), PROMPTS[:1], 3)

