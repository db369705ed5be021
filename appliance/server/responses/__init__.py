"""The OpenAI Responses API: `POST /v1/responses` (what Codex CLI speaks to custom providers).

| module | what |
|---|---|
| `protocol` | the request body (pydantic): input items, function tools, text format |
| `template` | input items, instructions and tools -> the dicts a HF chat template expects |
| `output` | generation events -> output items and the stream events that build them |
| `endpoint` | `POST /v1/responses`, streamed (numbered events) or not |
"""

from appliance.server.responses import endpoint

ROUTERS = (endpoint.router,)
