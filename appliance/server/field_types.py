"""Field types the request models of every API share: numbers in the ranges the engine accepts.

The engine's sampler keeps `top_k` in int32 and `seed` in int64 and the scheduler counts tokens
in int32, so the edge refuses anything outside those ranges with a 400 naming the field (the
engine would refuse it too, but only after tokenization). Request models are strict
(`STRICT_BODY`): `true` is not an integer, `"yes"` not a boolean, `"0.5"` not a number.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import AfterValidator, ConfigDict, Discriminator, Field, Tag

from appliance.engine.protocol import MAX_REPETITION_PENALTY, MIN_TOP_P

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 16  # stop strings are matched on every token's text: keep that work small
MAX_STOP_LENGTH = 256

# extra="ignore": agents send many fields we do not use; strict: no silent type coercion.
STRICT_BODY = ConfigDict(extra="ignore", strict=True)

TokenCount = Annotated[int, Field(ge=1, le=INT32_MAX)]
TopK = Annotated[int, Field(ge=0, le=INT32_MAX)]  # 0: off
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # below the model's vocab: checked per request
Probability = Annotated[float, Field(ge=MIN_TOP_P, le=1.0, allow_inf_nan=False)]  # top_p
RepetitionPenalty = Annotated[float, Field(ge=1 / MAX_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
                                           allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters are an object (a call's arguments are one JSON object): OpenAI and
    Anthropic refuse a schema of another type, and a forced call could not satisfy one."""
    kind = schema.get("type", "object")
    if kind != "object":
        raise ValueError(f'a tool\'s parameters must be a JSON schema of "type": "object", '
                         f"got {kind!r}")
    return schema


ObjectSchema = Annotated[dict[str, Any], AfterValidator(_object_schema)]


def tagged_union(family: str, members: dict[str, type], other: type,
                 default: str | None = None) -> Any:
    """The union of `members`, chosen by a value's `type` (`default` where it has none); a value
    of any other type parses as `other`, for the handler to refuse or leave out by name. Tags are
    named `family[type]`: errors.py leaves such parts out of a field's path."""
    def kind(value: Any) -> str:
        found = (value.get("type", default) if isinstance(value, dict)
                 else getattr(value, "type", default))
        # a `type` that is not a string (a list, an object) is no member's: `other` refuses it
        return f"{family}[{found if isinstance(found, str) and found in members else 'other'}]"

    choices = [Annotated[model, Tag(f"{family}[{name}]")] for name, model in members.items()]
    return Annotated[Union[(*choices, Annotated[other, Tag(f"{family}[other]")])],  # noqa: UP007
                     Discriminator(kind)]
