"""Pieces the OpenAI chat and completions endpoints share: sampling, usage, finish reasons."""

from __future__ import annotations

from typing import Any

from appliance.server import sse
from appliance.server.errors import ApiError, bad_request, openai_error_body
from appliance.server.generation import Finished, SamplingOptions
from appliance.server.openai.protocol import SamplingFields
from appliance.server.prompt import output_budget


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def reject_unsupported(body: SamplingFields) -> None:
    if body.n != 1:
        raise bad_request("Only n=1 is supported", "n")
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


def finish_reason(finished: Finished) -> str:
    if finished.num_tool_calls and finished.reason in ("stop", "stop_sequence"):
        return "tool_calls"
    return "stop" if finished.reason == "stop_sequence" else finished.reason


def usage(finished: Finished) -> dict[str, Any]:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def stream_error(error: ApiError) -> str:
    """The last SSE chunks of a stream that failed after it started."""
    return sse.data(openai_error_body(error.status, error.message, error.param, error.code)) + sse.DONE
