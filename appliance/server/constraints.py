"""What the engine must enforce for a request (grammar-constrained decoding, an engine
`Constraint`): forced tool calls (`tool_choice` required / named, Anthropic any / tool), a single
call when parallel calls are off, and a response format (JSON object or schema).

Every API normalizes its fields into `ToolChoice` / `ResponseFormat` and calls
`request_constraint`; the grammar comes from the model's tool-call format. A constraint is
validated here (`check_grammar`, in the tokenizer pool: a large schema takes a while to
compile), so a schema llguidance cannot compile is a 400 naming the field, not an engine
refusal. vLLM's `structured_outputs` (openai/common.py) is the other source of a constraint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from appliance.engine.constraints import check_grammar
from appliance.engine.protocol import Constraint
from appliance.server.errors import bad_request
from appliance.server.state import AppState
from appliance.server.tool_parsers import ToolCallFormat, ToolChoice, ToolSpec
from appliance.server.tool_parsers.grammar import json_value


@dataclass(frozen=True)
class ResponseFormat:
    kind: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None  # json_schema's schema

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The schema the reply must match (None: free text)."""
        if self.kind == "json_object":
            return {"type": "object"}
        return self.schema if self.kind == "json_schema" else None


TEXT = ResponseFormat()


def request_constraint(tool_format: ToolCallFormat, tools: list[ToolSpec], choice: ToolChoice | None,
                       parallel_calls: bool, response_format: ResponseFormat = TEXT) -> Constraint | None:
    """The grammar for a request; None when it is free. `choice` None: tools are off."""
    schema = response_format.json_schema
    if not tools or choice is None:
        if schema is None:
            return None
        if response_format.kind == "json_object":
            return Constraint("json_object", "")
        return Constraint("json_schema", json.dumps(schema))
    if choice.mode == "auto" and parallel_calls and schema is None:
        return None
    text_rule = json_value(schema) if schema is not None else None
    return Constraint("lark", tool_format.forced_call_grammar(tools, choice, parallel_calls, text_rule))


async def checked(state: AppState, constraint: Constraint | None, param: str) -> Constraint | None:
    """`constraint`, once llguidance has compiled it; a 400 naming `param` if it cannot."""
    if constraint is None:
        return None
    try:
        await state.tokenizers.run(lambda _tokenizer: check_grammar(constraint))
    except ValueError as e:
        raise bad_request(f"{param} cannot be enforced: {e}", param) from None
    return constraint
