"""A minimal OpenAI-compatible chat server on a local model, built on http.server.

Enough of the API for `openai:` judging to run offline against any model dlma can load:
`POST /v1/chat/completions` (messages, max_tokens; greedy decoding, temperature ignored)
and `GET /v1/models`. One request is generated at a time. It binds to 127.0.0.1 by
default; it has no authentication and is meant for tests and local experiments, not
for serving users (use vLLM or llama.cpp's server for that).

    python -m dlma.serve --model embedded --port 8000
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 dlma evaluate ... --judge openai:embedded
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .generate import SamplingParams, TransformersBackend
from .models import load_model
from .prompts import Renderer, as_messages


class ChatServer:
    """Serve `model` on host:port (port 0: any free port) in a background thread.

    `requests` counts chat-completion requests received. `faults(body) -> status or None`
    lets a test make the server answer some requests with an HTTP error.
    """

    def __init__(self, model, tokenizer, *, host: str = "127.0.0.1", port: int = 0, name: str = "dlma",
                 max_tokens: int = 64, faults: Callable[[dict], int | None] | None = None):
        self.backend = TransformersBackend(model, tokenizer, batch_size=1)
        self.tok, self.name, self.max_tokens, self.faults = tokenizer, name, max_tokens, faults
        self.renderer = Renderer(tokenizer, None)
        self.requests = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def complete(self, body: dict) -> dict:
        msgs = as_messages(body["messages"])
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or self.max_tokens)
        with self.lock:
            s = self.backend.sample([self.renderer.context_ids(msgs, "bare")], SamplingParams(max_tokens, 0.0, 1.0, 0))[0]
        text = self.tok.decode(s.ids, skip_special_tokens=True)
        return {"id": f"chatcmpl-{self.requests}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", self.name),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if s.finished else "length"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": len(s.ids), "total_tokens": len(s.ids)}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model", "owned_by": "dlma"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                except (ValueError, json.JSONDecodeError):
                    self._send(400, {"error": {"message": "body is not JSON"}})
                    return
                with server.lock:
                    server.requests += 1
                status = server.faults(body) if server.faults else None
                if status:
                    self._send(status, {"error": {"message": "injected fault", "type": "server_error"}})
                    return
                if not isinstance(body.get("messages"), list):
                    self._send(400, {"error": {"message": "`messages` must be a list"}})
                    return
                self._send(200, server.complete(body))

        return Handler

    def start(self) -> "ChatServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dlma.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model, args.dtype, args.device)
    srv = ChatServer(model, tok, host=args.host, port=args.port, name=args.model)
    print(f"serving {args.model} at {srv.url}", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
