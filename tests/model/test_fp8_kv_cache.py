"""The FP8 (e4m3) KV cache through ModelRunner (`kv_dtype`, YAML kv.dtype: fp8_e4m3): the
tiny model's logits and greedy tokens against the same model with a float32 cache, the pool's
size, per-layer scales read from a checkpoint, and the refusal of MLA models.

Tolerances. e4m3 keeps 3 mantissa bits: each cached K/V element is off by at most 2^-4 of its
value (RMS about 2^-4 / sqrt(3), 3.6%), and the logits move by the same order: the float32
cache from the same weights is the reference, and the logits' error is held to 8% of their
norm on average over the steps and 15% at any step (random weights give near-flat logits, whose
norm is small beside the hidden state's error: measured 3-11% per step, 4-6% on average). A
wrong scale or a misread cache moves them by 100% and more. The greedy token must be the
reference's wherever the reference's top two logits are apart by more than a tenth of their
range, and at all but 10% of the steps (one, of a few); teacher-forced, so one flipped near-tie does not derail
the rest.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from appliance.config import ConfigError, load_config
from appliance.model import ForwardBatch, ModelRunner, ModelSource
from appliance.model.loader import LoadError
from appliance.model.runner import KVDtypeError
from appliance.model.tiny import ensure_tiny_checkpoint
from helpers import greedy_generate, save_tiny_hf_model
from kernels.reference.kv_cache import dequantize, quantize

F8 = torch.float8_e4m3fn
PROMPTS = [[5, 17, 99, 3, 150, 8, 41, 7, 66, 12, 90, 33, 141, 60, 2, 18, 77], [130, 11, 7, 2, 19]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("fp8") / "tiny")


def forced_logits(runner: ModelRunner, prompt: list[int], follow: list[int]) -> torch.Tensor:
    """Logits after the prompt (one prefill) and after each token of `follow` (decodes),
    [len(follow) + 1, V]: the same inputs whatever the cache makes the model prefer."""
    ps = runner.page_size
    pages = list(range(-(-(len(prompt) + len(follow)) // ps)))
    i32 = dict(dtype=torch.int32)

    def step(ids: list[int], start: int, decode: bool) -> torch.Tensor:
        pos = list(range(start, start + len(ids)))
        return runner.forward(ForwardBatch(
            input_ids=torch.tensor(ids, **i32), positions=torch.tensor(pos, **i32),
            query_start=torch.tensor([0, len(ids)], **i32),
            prefix_lens=torch.tensor([start], **i32),
            seq_lens=torch.tensor([start + len(ids)], **i32),
            page_table=torch.tensor([pages], **i32),
            slot_mapping=torch.tensor([pages[p // ps] * ps + p % ps for p in pos], **i32),
            num_decode=int(decode)))[0]

    out = [step(prompt, 0, False)]
    for i, token in enumerate(follow):
        out.append(step([token], len(prompt) + i, True))
    return torch.stack(out)                                                # [N, V]


def _compare(ref_runner: ModelRunner, fp8_runner: ModelRunner, steps: int = 24) -> None:
    for prompt in PROMPTS:
        (follow,) = greedy_generate(ref_runner, [prompt], steps)   # the reference's own tokens
        ref = forced_logits(ref_runner, prompt, follow[:-1])               # [steps, V]
        assert ref.argmax(-1).tolist() == follow
        got = forced_logits(fp8_runner, prompt, follow[:-1])
        err = (got - ref).norm(dim=-1) / ref.norm(dim=-1)                  # [N]
        assert err.mean() < 0.08 and err.max() < 0.15, err
        assert err.min() > 0                                  # the cache did quantize
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.1 * ref.abs().amax(dim=-1)  # no near-tie
        same = got.argmax(-1) == ref.argmax(-1)
        assert same[clear].all() and (~same).sum() <= max(1, len(same) // 10), (same, clear)


def test_fp8_cache_logits_close_to_float32_cache(tiny):
    ref = ModelRunner(str(tiny), kv_num_pages=64, page_size=4)
    fp8 = ModelRunner(str(tiny), kv_num_pages=64, page_size=4, kv_dtype=F8)
    assert all(c.dtype == F8 for caches in fp8.kv_caches for c in caches)
    assert "fp8_e4m3" in fp8.kv_summary() and "float32" in ref.kv_summary()
    _compare(ref, fp8)


def test_fp8_pool_holds_more_pages_in_the_same_memory(tiny):
    """One byte an element: 4x the pages of a float32 cache (2x of bf16) for one budget."""
    f32 = ModelRunner(str(tiny), memory_fraction=0.01, page_size=16)
    fp8 = ModelRunner(str(tiny), memory_fraction=0.01, page_size=16, kv_dtype=F8)
    assert f32.kv_bytes_per_page() == 4 * fp8.kv_bytes_per_page()
    assert abs(fp8.num_pages - 4 * f32.num_pages) < 4
    bf16 = ModelRunner(str(tiny), memory_fraction=0.01, page_size=16, dtype=torch.bfloat16)
    assert bf16.kv_bytes_per_page() == 2 * fp8.kv_bytes_per_page()


def _with_scales(folder, scales: dict[str, float]) -> None:
    """Add one-element float32 scale tensors to the checkpoint, as FP8 exporters store them."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors.update({name: torch.tensor([value]) for name, value in scales.items()})
    save_file(tensors, path, metadata={"format": "pt"})


def test_checkpoint_scales_are_read_and_used(tmp_path):
    """Layer 0 in llm-compressor's spelling, layer 1 in ModelOpt's; the scales divide what is
    stored and multiply what is read, so the logits stay close to the float32 cache's while
    the stored values are those of the scaled format."""
    folder = save_tiny_hf_model(tmp_path / "ckpt")
    ref = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    _with_scales(folder, {"model.layers.0.self_attn.k_scale": 0.05,
                          "model.layers.0.self_attn.v_scale": 0.02,
                          "model.layers.1.self_attn.k_proj.k_scale": 0.5,
                          "model.layers.1.self_attn.v_proj.v_scale": 0.25})
    fp8 = ModelRunner(str(folder), kv_num_pages=64, page_size=4, kv_dtype=F8)
    layers = [m for m in fp8.model.modules() if hasattr(m, "set_kv_scales")]
    got = [s for m in layers for s in (m.k_scale, m.v_scale)]
    assert got == pytest.approx([0.05, 0.02, 0.5, 0.25])
    _compare(ref, fp8, steps=8)
    # a 16-bit/float32 cache ignores them: its scales stay 1.0
    plain = ModelRunner(str(folder), kv_num_pages=64, page_size=4)
    assert all((m.k_scale, m.v_scale) == (1.0, 1.0) for m in plain.model.modules()
               if hasattr(m, "set_kv_scales"))
    # layer 0's keys do not depend on the cache (no attention before them): the last sequence
    # both ran stored exactly the float32 cache's keys in the scaled format
    n = len(PROMPTS[-1]) + 5
    stored, want = fp8.kv_caches[0][0][:n], ref.kv_caches[0][0][:n]
    assert torch.equal(stored.view(torch.uint8), quantize(want, F8, 0.05).view(torch.uint8))
    assert (dequantize(stored, 0.05) - want).abs().max() <= 2 ** -4 * want.abs().max()


@pytest.mark.parametrize("bad,why", [({"model.layers.0.self_attn.k_scale": 0.5}, "no v scale"),
                                     ({"model.layers.0.self_attn.k_scale": -1.0,
                                       "model.layers.0.self_attn.v_scale": 1.0}, "positive")])
def test_bad_checkpoint_scales_are_named(tmp_path, bad, why):
    folder = save_tiny_hf_model(tmp_path / "ckpt")
    _with_scales(folder, bad)
    with pytest.raises(LoadError, match=f"model.layers.0.self_attn.k_scale.*{why}"):
        ModelRunner(str(folder), kv_num_pages=8, page_size=4, kv_dtype=F8)


def test_mla_model_refuses_fp8_cache():
    """DeepSeek's latent cache has no FP8 kernels: refused by name before any weight loads,
    as a ConfigError naming kv.dtype when it comes from the daemon's config."""
    source = ModelSource(preset="deepseek-v2-lite", load_format="dummy")
    with pytest.raises(KVDtypeError, match="kv.dtype: fp8_e4m3 .*MLAttention"):
        ModelRunner(source, kv_num_pages=8, kv_dtype=F8)
    config = load_config(overrides=["model.preset=deepseek-v2-lite", "model.load_format=dummy",
                                     "kv.dtype=fp8_e4m3"])
    files = SimpleNamespace(checkpoint=None, preset="deepseek-v2-lite")
    with pytest.raises(ConfigError, match="^kv.dtype: fp8_e4m3"):
        ModelRunner.from_config(config, files, "cpu", torch.float32)


def test_config_key():
    assert load_config().kv.dtype == "auto"
    assert load_config(overrides=["kv.dtype=fp8_e4m3"]).kv.dtype == "fp8_e4m3"
    with pytest.raises(ConfigError, match="kv.dtype: must be one of auto, fp8_e4m3"):
        load_config(overrides=["kv.dtype=fp8"])
