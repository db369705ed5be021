"""Pieces the OpenAI endpoints share: sampling, choices (n), tools and their constraint,
usage, finish reasons, stream errors."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from appliance.engine.constraints import check_grammar
from appliance.engine.protocol import Constraint
from appliance.engine.sampling_defaults import SamplingDefaults
from appliance.server import sse
from appliance.server.errors import ApiError, bad_request, openai_error_body
from appliance.server.generation import Finished, GenerationJob, SamplingOptions
from appliance.server.openai.protocol import NamedToolChoice, SamplingFields, StructuredOutputs, Tool
from appliance.server.prompt import output_budget
from appliance.server.tool_parsers import ToolChoice, ToolSpec

MAX_CHOICES = 16  # n: each choice is an engine request holding its own KV pages


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def reject_unsupported(body: SamplingFields) -> None:
    if not 1 <= body.n <= MAX_CHOICES:
        raise bad_request(f"n must be between 1 and {MAX_CHOICES}, got {body.n}", "n")


def sampling_options(body: SamplingFields, prompt_len: int, max_model_len: int,
                     requested: int | None, param: str, default_cap: int | None = None, *,
                     vocab_size: int, defaults: SamplingDefaults,
                     logprobs: int | None = None) -> SamplingOptions:
    """The request's sampling fields, checked against the model (`vocab_size`) and its output
    budget, `defaults` for those it leaves out; `logprobs`: the alternatives per token the
    endpoint's own fields asked for."""
    budget_args = {} if default_cap is None else {"default_cap": default_cap}
    max_tokens = output_budget(prompt_len, requested, max_model_len, param=param, **budget_args)
    min_tokens = body.min_tokens or 0
    if min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({min_tokens}) must not exceed {param} ({max_tokens})", "min_tokens")
    return SamplingOptions(
        max_tokens=max_tokens,
        **defaults.fill(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                        repetition_penalty=body.repetition_penalty),
        seed=body.seed,
        stop=stop_strings(body.stop),
        ignore_eos=body.ignore_eos,
        logit_bias=logit_bias(body.logit_bias, vocab_size),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        min_tokens=min_tokens,
        logprobs=logprobs,
        constraint=structured_constraint(body.structured_outputs),
        speculative=body.speculative,
    )


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} with each id a decimal integer in [0, vocab_size)."""
    pairs = []
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise bad_request(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}",
                              "logit_bias")
        pairs.append((int(key), value))
    return tuple(pairs)


def structured_constraint(spec: StructuredOutputs | None) -> Constraint | None:
    """The engine constraint of vLLM's `structured_outputs`, checked here (a 400 naming the
    problem) before the request is tokenized."""
    if spec is None:
        return None
    for name in ("regex", "choice"):
        if getattr(spec, name) is not None:
            raise bad_request(f"structured_outputs.{name} is not supported; use json or grammar",
                              "structured_outputs")
    given = [c for c in (_json_constraint(spec.json_schema),
                         Constraint("json_object") if spec.json_object else None,
                         None if spec.grammar is None else Constraint("lark", spec.grammar)) if c]
    if len(given) != 1:
        raise bad_request("structured_outputs needs exactly one of json, json_object or grammar",
                          "structured_outputs")
    try:
        check_grammar(given[0])
    except ValueError as e:
        raise bad_request(f"structured_outputs: {e}", "structured_outputs") from None
    return given[0]


def _json_constraint(schema: dict[str, Any] | str | None) -> Constraint | None:
    if schema is None:
        return None
    return Constraint("json_schema", schema if isinstance(schema, str) else json.dumps(schema))


def choice_jobs(job: GenerationJob, n: int) -> list[GenerationJob]:
    """One engine request per choice; with a seed, choice i samples with seed + i."""
    seed = job.sampling.seed
    return [job if i == 0 or seed is None else replace(job, sampling=replace(job.sampling, seed=seed + i))
            for i in range(n)]


def tool_setup(tools: list[Tool] | None, tool_choice: str | NamedToolChoice | None
               ) -> tuple[list[ToolSpec], ToolChoice | None]:
    """The offered functions and the normalized choice (None: tools are off)."""
    specs = [ToolSpec(t.function.name, t.function.parameters or {}) for t in tools or []]
    if not specs or tool_choice == "none":
        return specs, None
    if isinstance(tool_choice, NamedToolChoice):
        return specs, ToolChoice("named", tool_choice.function.name)
    return specs, ToolChoice("required" if tool_choice == "required" else "auto")


def merged_constraint(structured: Constraint | None, other: Constraint | None) -> Constraint | None:
    """vLLM's `structured_outputs`, or the constraint of tool_choice / response_format: one
    grammar per request, so not both."""
    if structured is not None and other is not None:
        raise bad_request("structured_outputs cannot be combined with response_format, a forced "
                          "tool_choice or parallel_tool_calls: false", "structured_outputs")
    return structured or other


def finish_reason(finished: Finished) -> str:
    if finished.called_tools:
        return "tool_calls"
    return "stop" if finished.reason == "stop_sequence" else finished.reason


def usage(finished: Finished | list[Finished]) -> dict[str, Any]:
    """Prompt tokens once (the choices share the prompt; cached: the first choice's), completion
    tokens summed over the choices."""
    choices = finished if isinstance(finished, list) else [finished]
    first = choices[0]
    completion = sum(f.completion_tokens for f in choices)
    out: dict[str, Any] = {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
                           "total_tokens": first.prompt_tokens + completion,
                           "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}
    reasoning = sum(f.reasoning_tokens for f in choices)
    if reasoning:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def stream_error(error: ApiError) -> str:
    """The last SSE chunks of a stream that failed after it started."""
    return sse.data(openai_error_body(error.status, error.message, error.param, error.code)) + sse.DONE
