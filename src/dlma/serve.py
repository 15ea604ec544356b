"""A minimal OpenAI-compatible chat server on a local model, built on http.server.

Enough of the API for `openai:` judging to run offline against any model dlma can load:
`POST /v1/chat/completions` (messages, max_tokens; greedy decoding, temperature ignored)
and `GET /v1/models`. One request is generated at a time. Every request gets a status and
a JSON body: a malformed one a 4xx naming what is wrong, a failure a 500, and the server
keeps serving; max_tokens is capped (--max-tokens-cap) and the body size too. It binds to
127.0.0.1 by default; it has no authentication and is meant for tests and local
experiments, not for serving users (use vLLM or llama.cpp's server for that).

    dlma serve --model embedded --port 8000
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 dlma evaluate ... --judge openai:embedded
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from .data import lone_surrogate
from .errors import DlmaError
from .generate import SamplingParams, TransformersBackend
from .prompts import Messages, Renderer, as_messages


MAX_BODY = 1 << 20  # bytes: a chat request is text; a larger Content-Length is refused unread


class BadRequest(Exception):
    """A request the server answers with `status` and this message instead of a completion."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_chat(body: Any, default_tokens: int, cap: int) -> tuple[Messages, int]:
    """The messages and max_tokens (at most `cap`: the decoding cache is allocated for them) of a
    chat-completion body; a BadRequest says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest(400, f"the body must be a JSON object, got {type(body).__name__}")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest(400, "`messages` must be a non-empty list of {role, content} objects")
    bad = lone_surrogate(msgs)
    if bad is not None:
        raise BadRequest(400, f"`messages` holds the lone surrogate {bad}, which is no character")
    try:
        msgs = as_messages(msgs)
    except DlmaError as exc:
        raise BadRequest(400, f"`messages`: {exc}") from None
    n = body.get("max_tokens", body.get("max_completion_tokens"))
    if n is None:
        return msgs, min(default_tokens, cap)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) or n < 1:
        raise BadRequest(400, f"`max_tokens` must be a whole number of at least 1, got {n!r}")
    return msgs, min(int(n), cap)


class ChatServer:
    """Serve `model` on host:port (port 0: any free port) in a background thread.

    `requests` counts chat-completion requests received. `faults(body) -> status or None`
    lets a test make the server answer some requests with an HTTP error. max_tokens is what a
    request without one gets; max_tokens_cap bounds what one may ask; read_timeout (seconds)
    bounds the wait for a body shorter than its Content-Length.
    """

    def __init__(self, model, tokenizer, *, host: str = "127.0.0.1", port: int = 0, name: str = "dlma",
                 max_tokens: int = 64, max_tokens_cap: int = 1024, read_timeout: float = 30.0,
                 faults: Callable[[dict], int | None] | None = None):
        self.backend = TransformersBackend(model, tokenizer, batch_size=1)
        self.tok, self.name, self.max_tokens, self.faults = tokenizer, name, max_tokens, faults
        self.max_tokens_cap, self.read_timeout = max_tokens_cap, read_timeout
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
        msgs, max_tokens = parse_chat(body, self.max_tokens, self.max_tokens_cap)
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
            timeout = server.read_timeout  # socket reads: a body shorter than its Content-Length ends, not hangs

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
                self.close_connection = True  # what is left of a refused body must not read as the next request
                self._send(status, {"error": {"message": message, "type": kind}})

            def _body(self) -> Any:
                raw = self.headers.get("Content-Length")
                try:
                    n = int(raw)
                except (TypeError, ValueError):
                    raise BadRequest(411, f"Content-Length must be a whole number of bytes, got {raw!r}") from None
                if not 0 <= n <= MAX_BODY:
                    raise BadRequest(413 if n > 0 else 400, f"Content-Length must be between 0 and {MAX_BODY}, got {n}")
                try:
                    data = self.rfile.read(n)
                except TimeoutError:
                    raise BadRequest(408, f"the body did not arrive: fewer than Content-Length {n} bytes") from None
                if len(data) < n:
                    raise BadRequest(400, f"the body has {len(data)} bytes, fewer than Content-Length {n}")
                try:
                    return json.loads(data)
                except ValueError:
                    raise BadRequest(400, "body is not JSON") from None

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model", "owned_by": "dlma"}]})
                else:
                    self._error(404, "not found")

            def do_POST(self) -> None:
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._error(404, "not found")
                    return
                try:
                    body = self._body()
                    with server.lock:
                        server.requests += 1
                    status = server.faults(body) if server.faults and isinstance(body, dict) else None
                    if status:
                        self._error(status, "injected fault", "server_error")
                        return
                    self._send(200, server.complete(body))
                except BadRequest as exc:
                    self._error(exc.status, str(exc))
                except Exception as exc:  # noqa: BLE001  (one failed request must not stop the server)
                    self._error(500, f"{type(exc).__name__}: {exc}", "server_error")

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
