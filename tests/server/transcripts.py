"""Recorded-style outputs of each model family, written by hand from each family's chat template
(the assistant turn the template renders for these calls), and a tokenizer per family: the tiny
model's, plus the family's markup as added special tokens (as in the real tokenizers), so the
text reaches the parsers through the real detokenizer, token by token.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from appliance.server.tool_parsers import ToolSpec

TOOLS = [
    ToolSpec("Read", {"type": "object", "properties": {"file_path": {"type": "string"},
                                                      "limit": {"type": "integer"}},
                      "required": ["file_path"]}),
    ToolSpec("Write", {"type": "object", "properties": {"file_path": {"type": "string"},
                                                       "content": {"type": "string"}},
                       "required": ["file_path", "content"]}),
    ToolSpec("Bash", {"type": "object", "properties": {"command": {"type": "string"},
                                                      "timeout": {"type": "integer"},
                                                      "run_in_background": {"type": "boolean"},
                                                      "env": {"type": "object"}},
                      "required": ["command"]}),
]

CODE = 'def greet(name: str) -> str:\n    return f"Hello, {name}!"\n\n# ```fenced``` ok\n'
WRITE = {"file_path": "/repo/src/greet.py", "content": CODE}
READ = {"file_path": "/repo/README.md", "limit": 40}
BASH = {"command": "pytest -q tests/", "timeout": 120, "run_in_background": False, "env": {"CI": "1"}}

# Markup that is an added (special) token in each family's real tokenizer.
SPECIAL_TOKENS = {
    "hermes": [],
    "qwen3_coder": [],
    "glm45": ["<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"],
    "kimi_k2": ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                "<|tool_call_argument_begin|>", "<|tool_call_end|>"],
    "deepseek_v3": ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                    "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"],
    "deepseek_v31": ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                     "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"],
    "harmony": ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>",
                "<|return|>"],
}


@dataclass(frozen=True)
class Transcript:
    format: str
    text: str  # the model's output (end-of-sequence token excluded)
    content: str
    calls: list[tuple[str, dict[str, Any]]]
    reasoning: str = ""
    streamed_call: int | None = 0  # a call whose arguments must arrive in several fragments
    tools: list[ToolSpec] = field(default_factory=lambda: TOOLS)


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def render(fmt: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """The calls as the family's chat template writes them in an assistant turn."""
    if fmt == "hermes":
        return "\n".join(f'<tool_call>\n{json.dumps({"name": n, "arguments": a}, ensure_ascii=False)}\n</tool_call>'
                         for n, a in calls)
    if fmt == "qwen3_coder":
        return "\n".join(f"<tool_call>\n<function={n}>\n" + "".join(
            f"<parameter={k}>\n{_value(v)}\n</parameter>\n" for k, v in a.items()) + "</function>\n</tool_call>"
            for n, a in calls)
    if fmt == "glm45":
        return "\n".join(f"<tool_call>{n}\n" + "".join(
            f"<arg_key>{k}</arg_key>\n<arg_value>{_value(v)}</arg_value>\n" for k, v in a.items()) + "</tool_call>"
            for n, a in calls)
    if fmt == "kimi_k2":
        return "<|tool_calls_section_begin|>" + "".join(
            f"<|tool_call_begin|>functions.{n}:{i}<|tool_call_argument_begin|>{json.dumps(a, ensure_ascii=False)}"
            "<|tool_call_end|>" for i, (n, a) in enumerate(calls)) + "<|tool_calls_section_end|>"
    if fmt == "deepseek_v3":
        return "<｜tool▁calls▁begin｜>" + "\n".join(
            f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{json.dumps(a, ensure_ascii=False)}\n```"
            "<｜tool▁call▁end｜>" for n, a in calls) + "<｜tool▁calls▁end｜>"
    if fmt == "deepseek_v31":
        return "<｜tool▁calls▁begin｜>" + "".join(
            f"<｜tool▁call▁begin｜>{n}<｜tool▁sep｜>{json.dumps(a, ensure_ascii=False)}<｜tool▁call▁end｜>"
            for n, a in calls) + "<｜tool▁calls▁end｜>"
    if fmt == "harmony":  # one call per turn: the turn ends at <|call|>
        ((n, a),) = calls
        return (f"<|channel|>commentary to=functions.{n} <|constrain|>json<|message|>"
                f"{json.dumps(a, ensure_ascii=False)}<|call|>")
    raise KeyError(fmt)


TWO = [("Write", WRITE), ("Bash", BASH)]
TRANSCRIPTS = [
    Transcript("hermes", "I'll write the file, then run the tests.\n" + render("hermes", TWO),
               "I'll write the file, then run the tests.", TWO),
    Transcript("hermes", render("hermes", [("Read", READ)]), "", [("Read", READ)]),
    Transcript("qwen3_coder", "Writing it now.\n\n" + render("qwen3_coder", TWO), "Writing it now.", TWO),
    Transcript("qwen3_coder",  # the template writes Python text for scalars: True / False
               "<tool_call>\n<function=Bash>\n<parameter=command>\nls\n</parameter>\n"
               "<parameter=run_in_background>\nTrue\n</parameter>\n<parameter=timeout>\n30\n</parameter>\n"
               "</function>\n</tool_call>", "",
               [("Bash", {"command": "ls", "run_in_background": True, "timeout": 30})], streamed_call=None),
    Transcript("glm45", "\nLet me create it." + "\n" + render("glm45", TWO), "Let me create it.", TWO),
    Transcript("glm45",  # GLM-4.7's template: no newlines
               "<tool_call>Read<arg_key>file_path</arg_key><arg_value>/a b.md</arg_value>"
               "<arg_key>limit</arg_key><arg_value>7</arg_value></tool_call>", "",
               [("Read", {"file_path": "/a b.md", "limit": 7})], streamed_call=None),
    Transcript("kimi_k2", "I will write the file and test it." + render("kimi_k2", TWO),
               "I will write the file and test it.", TWO),
    Transcript("deepseek_v3", render("deepseek_v3", TWO), "", TWO),
    Transcript("deepseek_v31", "Sure." + render("deepseek_v31", TWO), "Sure.", TWO),
    Transcript("harmony", "<|channel|>analysis<|message|>The user wants the greeter written. I should call "
               "Write.<|end|><|start|>assistant" + render("harmony", [("Write", WRITE)]).removesuffix("<|call|>"),
               "", [("Write", WRITE)], reasoning="The user wants the greeter written. I should call Write."),
    Transcript("harmony", "<|channel|>analysis<|message|>Simple greeting.<|end|><|start|>assistant"
               "<|channel|>final<|message|>Hello! How can I help?", "Hello! How can I help?", [],
               reasoning="Simple greeting.", streamed_call=None),
]


@cache
def family_tokenizer(fmt: str) -> Any:
    """The tiny model's tokenizer with the family's markup as added special tokens."""
    from transformers import AutoTokenizer

    from .conftest import tiny_checkpoint

    tokenizer = copy.deepcopy(AutoTokenizer.from_pretrained(tiny_checkpoint()))
    if SPECIAL_TOKENS[fmt]:
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[fmt]})
    return tokenizer
