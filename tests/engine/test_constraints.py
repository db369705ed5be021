"""Grammar-constrained decoding in the engine: whatever the model's logits say, the output is a
string the grammar accepts, ended only where the grammar may end; a bad grammar is a Rejected
for that request alone; an abort while its grammar compiles leaks nothing."""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from appliance.engine import constraints
from appliance.engine.constraints import (Grammars, allows, build_tokenizer, compile_matcher,
                                          tokenizer_json)
from appliance.engine import protocol
from appliance.engine.protocol import Constraint, GenerateRequest

from .conftest import REPO, FakeRunner, outputs, rejected, run_to_end

VOCAB = 1024  # the tiny tokenizer's 1000 ids, padded as a model's embedding often is
EOS = 2  # <|im_end|>

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "days": {"type": "integer", "minimum": 1, "maximum": 9},
                         "units": {"enum": ["metric", "imperial"]}},
          "required": ["city", "days", "units"], "additionalProperties": False}
# <tool_call> is one added token of the tiny tokenizer: llguidance names such tokens <...>
# (a quoted "<tool_call>" would be its bytes spelled by ordinary tokens).
TOOL_CALL_LARK = r"""
start: <tool_call> "\n" call "\n" </tool_call>
call: %json {"x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
             "type": "object", "properties": {"name": {"const": "get_weather"},
             "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                           "required": ["city"], "additionalProperties": false}},
             "required": ["name", "arguments"], "additionalProperties": false}
"""


CLOSERS = (4, 95)  # '"' and '}'


def eager_to_stop(last: torch.Tensor) -> torch.Tensor:
    """Random logits seeded by the last token, with the end of sequence far ahead of the rest
    and the padding ids (no token of the tokenizer) next: a model that would stop at once.
    Quotes and braces get a little more weight, so that free JSON closes in a few dozen tokens."""
    rows = []
    for token in last.tolist():
        g = torch.Generator().manual_seed(token)
        row = torch.randn(VOCAB, generator=g) * 4
        row[EOS] += 50
        row[1000:] += 40
        row[list(CLOSERS)] += 8
        rows.append(row)
    return torch.stack(rows)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_tokenizer_path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_path)


@pytest.fixture
def engine(make_engine, tiny_tokenizer_path):
    return make_engine(FakeRunner(VOCAB, eager_to_stop, eos_token_ids=(EOS,)), tiny_tokenizer_path)


def request(rid: int, constraint: Constraint | None, **fields) -> GenerateRequest:
    return GenerateRequest(rid, **{"prompt_ids": [5, 6, 7], "max_new_tokens": 120,
                                   "temperature": 0.8, "seed": rid, "constraint": constraint, **fields})


def text_of(engine, rid: int, hf_tokenizer) -> tuple[str, str]:
    outs = outputs(engine, rid)
    ids = [o.token_id for o in outs if o.token_id >= 0 and o.token_id != EOS]
    return hf_tokenizer.decode(ids), outs[-1].finish_reason


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_holds_whatever_the_logits_say(engine, hf_tokenizer, seed):
    engine._submit(request(seed, Constraint("json_schema", json.dumps(SCHEMA))))
    run_to_end(engine)
    text, reason = text_of(engine, seed, hf_tokenizer)
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)
    assert engine.scheduler.stats()["pages_used"] == 0 and not engine.grammars


def test_json_object_and_a_lark_tool_call(engine, hf_tokenizer):
    engine._submit(request(1, Constraint("json_object")))
    engine._submit(request(2, Constraint("lark", TOOL_CALL_LARK)))
    run_to_end(engine)
    obj, reason = text_of(engine, 1, hf_tokenizer)
    assert reason == "stop" and isinstance(json.loads(obj), dict)
    call, reason = text_of(engine, 2, hf_tokenizer)
    assert reason == "stop" and call.startswith("<tool_call>\n") and call.endswith("\n</tool_call>")
    parsed = json.loads(call.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert parsed["name"] == "get_weather" and isinstance(parsed["arguments"]["city"], str)


def test_constrained_and_free_rows_share_a_batch(engine, hf_tokenizer, make_engine):
    free = request(2, None, ignore_eos=True, max_new_tokens=30)
    engine._submit(request(1, Constraint("json_schema", json.dumps(SCHEMA))))
    # the grammar compiles on a worker thread: on a busy machine the free row would otherwise
    # finish before the constrained one is admitted
    concurrent.futures.wait([future for _, future in engine.compiling.values()], timeout=60)
    engine._submit(free)
    batches = []
    run = engine.runner.forward

    def recording(batch):
        batches.append(batch.num_rows)
        return run(batch)

    engine.runner.forward = recording
    run_to_end(engine)
    assert max(batches) == 2  # the two requests decoded in the same steps
    jsonschema.validate(json.loads(text_of(engine, 1, hf_tokenizer)[0]), SCHEMA)
    # the free row samples what it samples alone: the grammar touched its neighbour only
    alone = make_engine(FakeRunner(VOCAB, eager_to_stop, eos_token_ids=(EOS,)))
    alone._submit(free)
    run_to_end(alone)
    assert [o.token_id for o in outputs(engine, 2)] == [o.token_id for o in outputs(alone, 2)]


@pytest.mark.parametrize("constraint,words", [
    (Constraint("json_schema", "{not json"), "not valid JSON"),
    (Constraint("json_schema", '{"type": 12}'), "type"),
    (Constraint("json_schema", "[1, 2]"), "JSON object"),
    (Constraint("lark", "start: missing_rule"), "missing_rule"),
])
def test_a_bad_grammar_is_rejected_alone(engine, constraint, words):
    engine._submit(request(1, None, ignore_eos=True, max_new_tokens=5))
    engine._submit(request(2, constraint))
    run_to_end(engine)
    assert list(rejected(engine)) == [2] and words in rejected(engine)[2]
    assert [o.finish_reason for o in outputs(engine, 1)][-1] == "length"
    assert engine.scheduler.stats()["pages_used"] == 0 and not engine.compiling


@pytest.mark.parametrize("fields,words", [
    ({"constraint": Constraint("regex", "a+")}, "kind"),
    ({"constraint": Constraint("json_object"), "ignore_eos": True}, "ignore_eos"),
])
def test_unusable_constraint_fields_are_rejected(engine, fields, words):
    engine._submit(request(1, **{"constraint": None, **fields}))
    assert words in rejected(engine)[1] and not engine.compiling


def test_without_a_tokenizer_a_constraint_is_refused(make_engine):
    eng = make_engine(FakeRunner(VOCAB, eager_to_stop, eos_token_ids=(EOS,)))
    eng._submit(request(1, Constraint("json_object")))
    assert "tokenizer" in rejected(eng)[1]


def test_abort_while_compiling_leaks_nothing(engine, monkeypatch):
    release = threading.Event()
    compile_matcher_ = constraints.compile_matcher

    def slow(tokenizer, constraint):
        release.wait(10)
        return compile_matcher_(tokenizer, constraint)

    monkeypatch.setattr(constraints, "compile_matcher", slow)
    engine._submit(request(1, Constraint("json_object")))
    engine._submit(request(2, Constraint("json_object")))
    assert set(engine.compiling) == {1, 2}
    engine._abort(1)
    engine._abort(2)
    release.set()
    run_to_end(engine)
    assert [(o.token_id, o.finish_reason) for o in outputs(engine, 1)] == [(-1, "abort")]
    assert [(o.token_id, o.finish_reason) for o in outputs(engine, 2)] == [(-1, "abort")]
    assert not engine.compiling and not engine.requests and not engine.grammars
    assert not rejected(engine) and engine.scheduler.stats()["pages_used"] == 0
    # the rid is free again
    engine._submit(request(1, Constraint("json_object")))
    run_to_end(engine)
    assert outputs(engine, 1)[-1].finish_reason == "stop"


def test_abort_of_a_running_constrained_request(engine):
    engine._submit(request(1, Constraint("json_schema", json.dumps(SCHEMA))))
    for _ in range(50):
        engine._admit_compiled()
        engine.step()
        if len(outputs(engine, 1)) >= 3:
            break
    engine._abort(1)
    run_to_end(engine)
    assert outputs(engine, 1)[-1].finish_reason == "abort"
    assert not engine.grammars and engine.scheduler.stats()["pages_used"] == 0


def test_min_tokens_holds_back_the_end_until_the_grammar_must_end(engine, hf_tokenizer):
    """`start: "ok" " more"*`: the model wants to stop after "ok"; min_tokens makes it go on,
    and where the grammar allows nothing but the end, it ends."""
    engine._submit(request(1, Constraint("lark", 'start: "ok" (" more")*'), min_tokens=4))
    engine._submit(request(2, Constraint("lark", 'start: "ok"'), min_tokens=4))
    run_to_end(engine)
    text, reason = text_of(engine, 1, hf_tokenizer)
    assert reason == "stop" and text.startswith("ok more") and len(outputs(engine, 1)) >= 5
    assert text_of(engine, 2, hf_tokenizer) == ("ok", "stop")


def test_a_literal_holding_added_tokens_text_is_written_in_ordinary_tokens(engine, hf_tokenizer):
    """A quoted "<tool_call>" or "<|im_end|>" (added tokens of the tiny tokenizer) is text: the
    grammar forces it spelled by ordinary tokens. llguidance 1.9's own tokenization of forced
    text forced the added token, which its grammar then refused (the request was aborted)."""
    literal = "a<tool_call>b<|im_end|>c"
    engine._submit(request(1, Constraint("lark", json.dumps(literal).join(["start: ", ""]))))
    engine._submit(request(2, Constraint("json_schema", json.dumps(
        {"type": "object", "properties": {"k": {"const": "<tool_call>"}}, "required": ["k"]}))))
    run_to_end(engine)
    assert text_of(engine, 1, hf_tokenizer) == (literal, "stop")
    assert text_of(engine, 2, hf_tokenizer) == ('{"k": "<tool_call>"}', "stop")
    ids = [o.token_id for o in outputs(engine, 1) + outputs(engine, 2)]
    assert 998 not in ids and ids.count(EOS) == 2


def test_a_grammar_refusing_its_own_token_fails_that_request_alone(engine, monkeypatch):
    """Should a matcher refuse a token sampled under its own mask (an llguidance fault), that
    request ends in an error sent after its earlier tokens, never a normal end; its pages come
    back and the other request runs on."""
    engine._submit(request(1, Constraint("json_object")))
    engine._submit(request(2, Constraint("json_object")))
    advance, calls = engine.grammars.advance, []

    def refuse_rid_1_third(rid, token):
        calls.append(rid)
        return "Parser Error: no\nmore" if calls.count(1) == 3 and rid == 1 else advance(rid, token)

    monkeypatch.setattr(engine.grammars, "advance", refuse_rid_1_third)
    run_to_end(engine)
    failed = [i for i, m in enumerate(engine.sent) if isinstance(m, protocol.Rejected)]
    assert [engine.sent[i].rid for i in failed] == [1]
    assert rejected(engine)[1] == ("its grammar refused the token sampled under its own mask "
                                   "(Parser Error: no)")
    firsts = [o for m in engine.sent[:failed[0]] if isinstance(m, protocol.Outputs)
              for o in m.items if o.rid == 1]
    assert len(firsts) == len(outputs(engine, 1)) == 2          # its tokens, then the error
    assert all(o.finish_reason is None for o in outputs(engine, 1))
    assert outputs(engine, 2)[-1].finish_reason == "stop"
    assert engine.scheduler.stats()["pages_used"] == 0 and not engine.requests


@pytest.fixture(scope="module")
def ll_tokenizer(tiny_tokenizer_path):
    return build_tokenizer(tiny_tokenizer_path, VOCAB, [EOS])


def test_draft_tokens_the_grammar_forbids_are_rejected(ll_tokenizer, hf_tokenizer):
    """Speculative decoding composes: the masks along the drafts the grammar accepts, the
    first forbidden draft ends them, and the matcher is left where it was."""
    grammars = Grammars(VOCAB)
    grammars.add(1, compile_matcher(ll_tokenizer, Constraint("lark", 'start: "abc" "def"')))
    good = hf_tokenizer.encode("abcdef")
    masks, accepted = grammars.draft_bitmask(1, good)
    assert accepted == len(good) and allows(masks[-1], EOS)
    for i, token in enumerate(good):
        assert allows(masks[i], token)
    bad = good[:1] + hf_tokenizer.encode("zzz")
    masks, accepted = grammars.draft_bitmask(1, bad)
    assert accepted == 1 and masks.shape[0] == 2 and not allows(masks[1], bad[1])
    step = grammars.bitmask([(0, 1)], {})  # untouched: the first token is still the one to allow
    assert allows(step.bitmask[0], good[0]) and not allows(step.bitmask[0], EOS)


def test_padding_ids_and_early_end_are_never_allowed(ll_tokenizer):
    grammars = Grammars(VOCAB)
    grammars.add(1, compile_matcher(ll_tokenizer, Constraint("json_object")))
    mask = grammars.bitmask([(3, 1)], {})
    assert mask.rows.tolist() == [3]
    assert not any(allows(mask.bitmask[0], t) for t in [EOS, *range(1000, VOCAB)])


def test_an_llguidance_that_takes_one_eos_id_still_builds_the_tokenizer(
        monkeypatch, tiny_tokenizer_path, hf_tokenizer):
    """llguidance < 1.9 (the newest wheel on an older glibc, as on the GPU box) refuses a list
    of end-of-sequence ids: the grammar then ends on the first one."""
    import llguidance

    real = llguidance.LLTokenizer
    seen = []

    def one_eos_only(tokenizer, n_vocab=None, eos_token=None):
        if isinstance(eos_token, list):
            raise TypeError("argument 'eos_token': 'list' object cannot be interpreted as an integer")
        seen.append(eos_token)
        return real(tokenizer, n_vocab=n_vocab, eos_token=eos_token)

    monkeypatch.setattr(llguidance, "LLTokenizer", one_eos_only)
    tokenizer = build_tokenizer(tiny_tokenizer_path, VOCAB, [EOS, EOS + 1])
    assert seen == [EOS, EOS]   # the view of the tokenizer, then the text-only wrapper
    grammars = Grammars(VOCAB)
    grammars.add(1, compile_matcher(tokenizer, Constraint("lark", 'start: "ok"')))
    ok = hf_tokenizer.encode("ok")
    masks, accepted = grammars.draft_bitmask(1, ok)
    assert accepted == len(ok) and allows(masks[-1], EOS)  # the grammar ends on the first id


def _declared_only_folder(tiny: str, folder: Path) -> str:
    """The tiny tokenizer with two added tokens (a plain one, a special one) that only
    tokenizer_config.json's added_tokens_decoder declares, as older transformers saved them."""
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        "1000": {"content": "<plain>", "special": False, "normalized": True},
        "1001": {"content": "<sp>", "special": True, "normalized": False}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


TEXTS = ["hello world", '<tool_call>{"a": 1}</tool_call>', "<|im_end|> x", " ünï 😀", "a<plain>b<sp>c"]


def _assert_same_view(ours, theirs, n: int) -> None:
    """Two llguidance tokenizers with the same tokens, special ids and tokenizations."""
    assert [ours.decode_bytes([i]) for i in range(n)] == [theirs.decode_bytes([i]) for i in range(n)]
    assert [ours.is_special_token(i) for i in range(n)] == [theirs.is_special_token(i) for i in range(n)]
    for text in TEXTS:
        assert ours.tokenize_str(text) == theirs.tokenize_str(text)


@pytest.mark.parametrize("declared_only", [False, True])
def test_the_grammar_tokenizer_is_the_one_transformers_loads(tiny_tokenizer_path, tmp_path,
                                                            declared_only):
    """tokenizer_json reads the folder with `tokenizers` alone; llguidance's view of it has the
    same tokens, special ids and tokenizations as its view of transformers' tokenizer (which
    may differ in what llguidance does not read: the post-processor)."""
    import llguidance.hf

    folder = (_declared_only_folder(tiny_tokenizer_path, tmp_path / "declared") if declared_only
              else tiny_tokenizer_path)
    n = 1002 if declared_only else 1000
    ours = llguidance.LLTokenizer(tokenizer_json(folder), n_vocab=n, eos_token=EOS)
    theirs = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(folder), n_vocab=n,
                                          eos_token=EOS)
    _assert_same_view(ours, theirs, n)
    if declared_only:
        assert ours.decode_bytes([1000, 1001]) == b"<plain><sp>" and ours.is_special_token(1001)


def test_a_folder_without_tokenizer_json_goes_through_transformers(tiny_tokenizer_path,
                                                                    tmp_path, monkeypatch):
    """Its fast tokenizer (transformers converts a slow one) gives the same view; a tokenizer
    that stays slow is refused by name."""
    import llguidance
    import transformers

    folder = tmp_path / "slow"
    shutil.copytree(tiny_tokenizer_path, folder)
    (folder / "tokenizer.json").unlink()
    fast = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path: fast)
    _assert_same_view(llguidance.LLTokenizer(tokenizer_json(str(folder)), n_vocab=1000, eos_token=EOS),
                      llguidance.LLTokenizer(tokenizer_json(tiny_tokenizer_path), n_vocab=1000,
                                             eos_token=EOS), 1000)

    class SlowOnly:
        pass

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path: SlowOnly())
    with pytest.raises(ValueError, match="needs a fast tokenizer"):
        tokenizer_json(str(folder))


def test_the_grammar_tokenizer_does_not_import_transformers(tiny_tokenizer_path):
    """Its import (seconds of Python on a GPU box) held the GIL against start-up's graph
    capture on rank 0's main thread."""
    code = ("import sys; from appliance.engine.constraints import build_tokenizer; "
            f"build_tokenizer({tiny_tokenizer_path!r}, 1000, [2]); "
            "print('transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_compiler_starts_from_the_config_files_and_can_be_waited_for(tiny_tokenizer_path):
    """Rank 0 starts the compiler before the weights load (the vocabulary from the model's
    config files alone), and Ready waits for its tokenizer."""
    from appliance.config import load_config
    from appliance.engine.constraints import GrammarCompiler
    from appliance.engine.model_files import resolve_model_files
    from appliance.model.presets import PRESETS
    from appliance.model.runner import model_source, vocabulary

    config = load_config("configs/llama-3.1-8b.yaml", ["device=cpu"])
    source = model_source(config, resolve_model_files(config))
    assert vocabulary(source) == (PRESETS["llama-3.1-8b"]["vocab_size"],
                                  PRESETS["llama-3.1-8b"]["eos_token_id"])
    compiler = GrammarCompiler(tiny_tokenizer_path, 1000, [2])
    compiler.wait_for_tokenizer(60)
    try:
        assert compiler._tokenizer.done() and compiler._tokenizer.exception() is None
    finally:
        compiler.close()
