"""The chat server (dlma.serve) answers every request with a status and a JSON error, caps what a
request may ask for, and keeps serving (the cases are the catalogue's, tests/bad_inputs.py)."""

from __future__ import annotations

import json
import time

import pytest

from bad_inputs import REQUESTS, Request, send


@pytest.fixture(scope="module")
def server(embedded):
    from dlma.serve import ChatServer

    model, tok = embedded
    with ChatServer(model, tok, max_tokens_cap=4, read_timeout=1.0) as srv:
        yield srv


@pytest.mark.parametrize("req", REQUESTS, ids=[r.what for r in REQUESTS])
def test_a_malformed_request_gets_a_status_and_a_json_error(server, req):
    t0 = time.time()
    status, answer = send(server.url, req, timeout=20)
    assert status == req.status and req.says in answer["error"]["message"], (status, answer)
    assert time.time() - t0 < 10  # a short body ends at the read timeout, it does not hang
    ok, reply = send(server.url, Request("a good one", json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode(),
                                         200, ""))
    assert ok == 200 and reply["choices"][0]["message"]["role"] == "assistant"  # still serving


def test_max_tokens_is_capped(server):
    status, reply = send(server.url, Request("huge", json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}],
                                                                   "max_tokens": 10**8}).encode(), 200, ""))
    assert status == 200 and reply["usage"]["completion_tokens"] <= 4
