"""The per-request speculative-decoding opt-out reaches the engine from every generating
endpoint: `"speculative": false` -> GenerateRequest.speculative False; absent -> True."""

from __future__ import annotations

import pytest

from .conftest import MODEL

USER = [{"role": "user", "content": "hi"}]
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "max_tokens": 3},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 3},
    "/v1/messages": {"model": MODEL, "messages": USER, "max_tokens": 3},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 3},
}


@pytest.mark.parametrize("path", sorted(BODIES))
@pytest.mark.parametrize("sent, expected", [({}, True), ({"speculative": True}, True),
                                            ({"speculative": False}, False)])
def test_the_opt_out_reaches_the_engine(served, path, sent, expected):
    with served.http() as http:
        response = http.post(path, json={**BODIES[path], **sent})
    assert response.status_code == 200, response.text
    assert served.fake.requests[-1].speculative is expected
