"""`dlma serve`: the command answers an OpenAI-style chat request and stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request


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
