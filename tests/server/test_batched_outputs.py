"""Outputs the engine client hands over together (a speculative step's tokens, or several
steps' when the frontend fell behind) stream as fewer chunks with the same content, on every
API: text, tool-call arguments, log-probabilities, stop strings."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from .conftest import MODEL
from .test_openai_api import CALL_REPLY, TOOLS

USER = [{"role": "user", "content": "go"}]
REPLY = "Batched outputs stream as fewer chunks, 日本語 included."


@pytest.fixture()
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)


def _chat_stream(client: openai.OpenAI, **kwargs) -> list:
    return list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=64, stream=True,
                                               **kwargs))


def test_a_batch_of_tokens_is_one_chunk_with_all_their_text(client, served, tokenizer):
    served.fake.reply = REPLY
    tokens = len(tokenizer.encode(REPLY, add_special_tokens=False))
    served.fake.batch_size = 4
    chunks = _chat_stream(client)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == REPLY
    assert len(texts) <= -(-tokens // 4) + 1 < tokens  # a chunk a batch (a held-back character aside)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_call_arguments_and_text_are_the_same_batched(client, served):
    def call(batch: int) -> tuple[str, str, int]:
        served.fake.reply, served.fake.batch_size = CALL_REPLY, batch
        chunks = _chat_stream(client, tools=TOOLS)
        deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert deltas[0].function.name == "read_file"
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        return content, "".join(d.function.arguments or "" for d in deltas), len(deltas)

    content, arguments, deltas = call(1)
    batched_content, batched_arguments, batched_deltas = call(5)
    assert (batched_content, batched_arguments) == (content, arguments) == (
        "I will read it.", json.dumps({"path": "src/main.py"}))
    assert batched_deltas < deltas


def test_log_probabilities_are_the_same_batched(client, served):
    def logprobs(batch: int) -> tuple[list, list]:
        served.fake.reply, served.fake.batch_size = REPLY, batch
        chunks = _chat_stream(client, logprobs=True, top_logprobs=2)
        chat = [c.model_dump() for chunk in chunks for choice in chunk.choices if choice.logprobs
                for c in choice.logprobs.content]
        completion = [c.choices[0].logprobs for c in client.completions.create(
            model=MODEL, prompt="x", max_tokens=64, logprobs=2, stream=True) if c.choices and c.choices[0].logprobs]
        return chat, [(p.tokens, p.token_logprobs, p.text_offset) for p in completion]

    chat, completion = logprobs(1)
    batched_chat, batched_completion = logprobs(3)
    assert batched_chat == chat and len(chat) > 3
    joined = [sum((part[k] for part in completion), []) for k in range(3)]
    assert [sum((part[k] for part in batched_completion), []) for k in range(3)] == joined


def test_a_stop_string_inside_a_batch_ends_the_text_there(client, served):
    def stopped(batch: int) -> tuple[str, int]:
        served.fake.reply, served.fake.batch_size = "one two three four five six seven", batch
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=64, stop=["three"], stream=True,
            stream_options={"include_usage": True}))
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens

    assert stopped(16) == stopped(1)  # the tokens after the one that completed it not counted
    assert stopped(16)[0] == "one two "


def test_anthropic_and_responses_streams_batched(client, served):
    def streamed(batch: int) -> tuple[list[str], list[str]]:
        served.fake.reply, served.fake.batch_size = REPLY, batch
        messages = anthropic.Anthropic(base_url=served.base_url, api_key="unused", max_retries=0)
        with messages.messages.stream(model=MODEL, max_tokens=64, messages=USER) as stream:
            deltas = [e.delta.text for e in stream if e.type == "content_block_delta"]
        events = list(client.responses.create(model=MODEL, input="go", max_output_tokens=64, stream=True))
        assert events[-1].type == "response.completed"
        return deltas, [e.delta for e in events if e.type == "response.output_text.delta"]

    one = streamed(1)
    for unbatched, batched in zip(one, streamed(4)):
        assert "".join(batched) == "".join(unbatched) == REPLY
        assert len(batched) <= len(unbatched) // 2  # a delta a batch (held-back characters aside)


def test_return_token_ids_carries_every_id_batched(served):
    def streamed(batch: int) -> tuple[list[list[int]], str]:
        served.fake.reply, served.fake.batch_size = REPLY, batch
        body = {"model": MODEL, "prompt": "x", "max_tokens": 64, "stream": True, "return_token_ids": True}
        with served.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")]
        ids = [c["choices"][0]["token_ids"] for c in chunks if c["choices"][0].get("token_ids")]
        return ids, "".join(c["choices"][0]["text"] for c in chunks)

    ids, text = streamed(1)
    batched_ids, batched_text = streamed(4)
    assert sum(batched_ids, []) == sum(ids, []) and batched_text == text == REPLY
    assert all(len(i) == 1 for i in ids) and len(batched_ids) == -(-len(ids) // 4)
