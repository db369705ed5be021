"""The default tiny checkpoint (docs/INTERFACES.md §6), generated deterministically.

`ensure_tiny_checkpoint(path)` writes an HF folder that transformers' AutoModelForCausalLM
and AutoTokenizer load: a 2-layer LlamaForCausalLM (hidden 64, 4 heads, 2 kv heads,
intermediate 128, vocab 1000, 4096 positions) with weights from a fixed seed, and a
byte-level BPE tokenizer trained with `tokenizers` on a fixed corpus, with a ChatML chat
template that renders tools Hermes-style. The same bytes every time; the folder is built in
a temporary sibling and renamed into place (atomic_folder.py), so concurrent callers race
safely.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.model.atomic_folder import ensure_folder

VOCAB_SIZE = 1000
SEED = 1234
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
TOOL_TOKENS = ("<tool_call>", "</tool_call>")  # added (not special: the frontend parses them)
if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json")
FILES = (*TOKENIZER_FILES, "model.safetensors")

TINY_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "hidden_act": "silu", "initializer_range": 0.02, "torch_dtype": "float32",
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0,
}

# ChatML; tools rendered Hermes-style in the system turn; assistant tool calls as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>; tool results as user turns.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is none -%}{%- elif content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}{{- text(messages[0].content) + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- elif messages and messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + text(messages[0].content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' and loop.first -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + text(message.content) -}}"
    "{%- for call in (message.tool_calls or []) -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' -}}"
    "{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}"
    "{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + text(message.content)"
    " + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + text(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _corpus() -> list[str]:
    """A fixed training corpus: English about coding agents, Python, shell and JSON."""
    prose = (
        "The agent reads the repository, runs the tests, and edits the files that fail. "
        "A coding assistant answers questions about the code base and proposes patches. "
        "Please fix the bug in the parser so that the function returns the right value. "
        "The user asked to refactor the module, add type hints and write unit tests. "
        "I will call the tool to list the directory, then open the file and read it. "
        "The server streams tokens to the client while the model decodes the response. "
        "Each request has a prompt, a maximum number of new tokens and a temperature. "
        "When the build breaks, check the error message, the stack trace and the logs. "
        "Hello! How can I help you today? Sure, here is the updated function. "
        "Thanks, that works. Can you also explain why the cache was evicted? "
    )
    code = (
        "def add(a: int, b: int) -> int:\n    return a + b\n\n"
        "class Request:\n    def __init__(self, rid, prompt):\n        self.rid = rid\n"
        "        self.prompt = prompt\n\n"
        "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n\n"
        "import os\nimport json\nfrom pathlib import Path\n\n"
        "with open(path) as f:\n    data = json.load(f)\n\n"
        "try:\n    result = run(command)\nexcept ValueError as e:\n    raise RuntimeError(str(e))\n\n"
        "$ git status\n$ git diff --stat\n$ python -m pytest tests -q\n$ ls -la src/\n\n"
    )
    tools = (
        '{"name": "read_file", "arguments": {"path": "src/main.py"}}\n'
        '{"name": "run_command", "arguments": {"command": "pytest -q"}}\n'
        '{"name": "write_file", "arguments": {"path": "README.md", "content": "# Title"}}\n'
        '{"type": "function", "function": {"name": "search", "description": "Search the code", '
        '"parameters": {"type": "object", "properties": {"query": {"type": "string"}}, '
        '"required": ["query"]}}}\n'
    )
    words = (
        "abstract argument array assert async await boolean branch buffer build bytes cache "
        "callback channel checkpoint class client closure commit compile config connection "
        "container context coroutine database debug decode decorator default dependency "
        "deploy dictionary directory docker document encode endpoint environment error event "
        "exception execute export extension field filter format framework function generator "
        "global handler header import index inherit instance integer interface iterator "
        "kernel keyword lambda latency layer library lint list logger loop memory merge "
        "message method metric migration module mutex namespace network object operator "
        "optional package parameter parser patch pipeline pointer process profile property "
        "protocol proxy queue random record recursion refactor regex release render "
        "repository request resource response return runtime scheduler schema scope script "
        "search server session socket source stack statement static stream string struct "
        "subprocess syntax system template tensor terminal thread timeout token trace "
        "transaction tuple type update upload utility validate value variable vector version "
        "virtual warning webhook window worker workflow wrapper yield zipfile "
        "morning evening weather garden kitchen language history science music travel "
        "question answer problem solution example summary reason result detail feature "
    )
    lines = [prose, code, tools, words, words.title(), words.upper()]
    for i in range(40):  # some variety: numbers, identifiers, paths
        lines.append(f"line {i}: value_{i} = compute(x{i}, y{i * 7 % 13}) # step {i * 3}\n")
        lines.append(f"src/module_{i % 9}/file_{i}.py:{i * 11}: error: name 'var{i}' is not "
                     f"defined\n")
    return lines * 3


def _train_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(TOOL_TOKENS),
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    if tok.get_vocab_size() > VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens > {VOCAB_SIZE}")
    return tok


def _weights(cfg: dict) -> dict[str, "torch.Tensor"]:
    """Seeded N(0, 0.02) weights (norms 1) in a fixed order, named as HF Llama names them."""
    import torch  # here: the frontend reads TINY_CONFIG without importing torch

    gen = torch.Generator().manual_seed(SEED)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * cfg["initializer_range"]

    w = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "self_attn.q_proj.weight"] = rnd(q, h)
        w[p + "self_attn.k_proj.weight"] = rnd(kv, h)
        w[p + "self_attn.v_proj.weight"] = rnd(kv, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, q)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
        w[p + "mlp.gate_proj.weight"] = rnd(i, h)
        w[p + "mlp.up_proj.weight"] = rnd(i, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, i)
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = rnd(cfg["vocab_size"], h)
    return w


def _dump(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_tiny_checkpoint(folder: Path) -> None:
    """Write every file of the tiny checkpoint into `folder` (which must exist)."""
    from safetensors.torch import save_file

    write_tiny_tokenizer(folder)
    save_file(_weights(TINY_CONFIG), str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_tiny_tokenizer(folder: Path) -> None:
    """The tiny checkpoint's files but its weights (TOKENIZER_FILES): no torch needed."""
    _train_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(_dump(TINY_CONFIG))
    (folder / "generation_config.json").write_text(_dump(
        {"bos_token_id": 0, "eos_token_id": [2], "pad_token_id": 0}))
    specials = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "unk_token": None}
    (folder / "special_tokens_map.json").write_text(_dump(
        {k: v for k, v in specials.items() if v is not None}))
    (folder / "tokenizer_config.json").write_text(_dump({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE, **specials,
    }))


def ensure_tiny_checkpoint(path: str | os.PathLike) -> Path:
    """Create the tiny checkpoint at `path` unless it is already there; returns the path."""
    return ensure_folder(path, FILES, write_tiny_checkpoint)


def ensure_tiny_tokenizer(path: str | os.PathLike) -> Path:
    """The tiny checkpoint without its weights at `path` (created unless there): the stand-in
    tokenizer of dummy-weight presets, written without importing torch (seconds on a GPU box,
    on the frontend's path before the engine ranks spawn)."""
    return ensure_folder(path, TOKENIZER_FILES, write_tiny_tokenizer)
