"""The chat server: `dlma serve` answers an OpenAI-style chat request and stops cleanly on Ctrl-C; every
request gets a status and a JSON error, what a request may ask for is capped, and it keeps serving
(the cases are the catalogue's, tests/bad_inputs.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

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


def test_dlma_serve_answers_a_chat_request_and_stops_on_interrupt():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, "-m", "dlma.cli", "serve", "--port", "0", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving embedded at http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split(" at ")[1].split()[0]
        body = json.dumps({"model": "embedded", "max_tokens": 6,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
        req = urllib.request.Request(url + "/chat/completions", body, {"Content-Type": "application/json"})
        reply = json.load(urllib.request.urlopen(req, timeout=120))
        answer = reply["choices"][0]["message"]["content"]
        assert answer.strip() and reply["usage"]["completion_tokens"] <= 6
        models = json.load(urllib.request.urlopen(url + "/models", timeout=30))
        assert models["data"][0]["id"] == "embedded"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
