"""Pieces the OpenAI endpoints share: sampling, choices (n), tools and their constraint,
usage, finish reasons, stream errors."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from appliance.server import sse
from appliance.server.errors import ApiError, bad_request, openai_error_body
from appliance.server.generation import Finished, GenerationJob, SamplingOptions
from appliance.server.openai.protocol import NamedToolChoice, SamplingFields, Tool
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
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise bad_request(f"{name} is not supported by this server; omit it or send 0", name)


def sampling_options(body: SamplingFields, prompt_len: int, max_model_len: int,
                     requested: int | None, param: str, default_cap: int | None = None) -> SamplingOptions:
    budget_args = {} if default_cap is None else {"default_cap": default_cap}
    max_tokens = output_budget(prompt_len, requested, max_model_len, param=param, **budget_args)
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        stop=stop_strings(body.stop),
        ignore_eos=body.ignore_eos,
    )


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
