"""The default tiny checkpoint: deterministic bytes, loads in transformers and in ModelRunner."""
from __future__ import annotations

import hashlib
import multiprocessing as mp

import pytest

from appliance.model import ModelRunner
from appliance.model.tiny import FILES, TOKENIZER_FILES, ensure_tiny_checkpoint, ensure_tiny_tokenizer
from helpers import greedy_generate, hf_greedy


def _digest(folder, files: tuple[str, ...] = FILES) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("a") / "tiny")


def test_byte_identical_across_creations(tiny, tmp_path):
    other = ensure_tiny_checkpoint(tmp_path / "tiny")
    assert sorted(p.name for p in other.iterdir()) == sorted(FILES)
    assert _digest(other) == _digest(tiny)
    assert ensure_tiny_checkpoint(other) == other  # already there: untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_the_tokenizer_folder_is_the_checkpoint_without_its_weights(tiny, tmp_path):
    """Dummy-weight presets' stand-in tokenizer: the same files, byte for byte, but no
    model.safetensors."""
    folder = ensure_tiny_tokenizer(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == sorted(TOKENIZER_FILES)
    assert _digest(folder, TOKENIZER_FILES) == _digest(tiny, TOKENIZER_FILES)


def _create(path: str) -> None:
    ensure_tiny_checkpoint(path)


@pytest.mark.slow
def test_concurrent_creation(tiny, tmp_path):
    target = tmp_path / "race" / "tiny"
    ctx = mp.get_context("spawn")  # not fork: tokenizers threads do not survive fork
    procs = [ctx.Process(target=_create, args=(str(target),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _digest(target) == _digest(tiny)


def test_loads_in_transformers(tiny):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size, cfg.max_position_embeddings) == (
        64, 2, 4, 2, 128, 4096)
    assert len(tok) == cfg.vocab_size == 1000
    assert tok.eos_token == "<|im_end|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    text = "def add(a, b):\n    return a + b  # héllo ✓"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level


def test_chat_template(tiny):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}}}}]
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "open a.py"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "read_file",
                                                  "arguments": {"path": "a.py"}}}]},
            {"role": "tool", "content": "x = 1"}]
    s = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert s.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "read_file"' in s
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "read_file", "arguments": '
            '{"path": "a.py"}}\n</tool_call><|im_end|>\n') in s
    assert "<|im_start|>user\n<tool_response>\nx = 1\n</tool_response><|im_end|>\n" in s
    assert s.endswith("<|im_start|>assistant\n")
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                    add_generation_prompt=True)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_runner_matches_transformers(tiny):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    prompt = tok.apply_chat_template([{"role": "user", "content": "fix the bug"}],
                                     add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    runner = ModelRunner(str(tiny), kv_num_pages=16, page_size=16)
    assert runner.eos_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert runner.vocab_size == 1000 and runner.max_model_len == 4096
    assert greedy_generate(runner, [prompt], 10) == hf_greedy(tiny, [prompt], 10)
