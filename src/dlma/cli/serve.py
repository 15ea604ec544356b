"""`dlma serve`: a local OpenAI-compatible chat endpoint on a model dlma can load."""

from __future__ import annotations

import signal

from ..config import ModelConfig, add_config_args, config_from_args
from .common import formatter

HELP = """\
Serve a model (the embedded one, a Hugging Face id, a local directory such as a run's
final-model) on an OpenAI-compatible API: POST /v1/chat/completions (messages, max_tokens;
greedy answers under the model's bare chat template, as dlma evaluates them) and GET /v1/models.

For trying an aligned model by hand or with any OpenAI client, and for `dlma evaluate --judge
openai:MODEL` against a local judge without network access. One request is answered at a time
and there is no authentication: it binds to 127.0.0.1 unless told otherwise. To serve users,
use vLLM or another production server.

examples:
  dlma serve --model runs/default/final-model --port 8000
  OPENAI_BASE_URL=http://127.0.0.1:8000/v1 dlma evaluate --model M --judge openai:judge --out report/
"""


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model on a local OpenAI-compatible chat API", description=HELP,
                       formatter_class=formatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; default: 8000)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of a request that gives none (default: 64)")
    p.add_argument("--max-tokens-cap", type=int, default=1024, help="the most max_tokens a request gets (default: 1024)")
    add_config_args(p, ModelConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import load_model
    from ..serve import ChatServer

    mc = config_from_args(ModelConfig, args)
    model, tok = load_model(mc.model, mc.dtype, mc.device, attn=mc.attn_implementation)
    srv = ChatServer(model, tok, host=args.host, port=args.port, name=mc.model, max_tokens=args.max_tokens,
                     max_tokens_cap=args.max_tokens_cap)
    print(f"serving {mc.model} at {srv.url} (Ctrl-C to stop)", flush=True)
    # Ctrl-C (SIGINT) and SIGTERM stop the server cleanly, also where the process was started with SIGINT
    # ignored (a shell's background job): the main thread only waits while a thread of its own serves.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    srv.start()
    try:
        while srv.thread.is_alive():
            srv.thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0
