"""Write docs/bad-input.md: every case of tests/bad_inputs.py, run for real, with the line it prints.

    .venv/bin/python scripts/bad_input_table.py      # rewrites docs/bad-input.md
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bad_inputs import CASES, HANDLED, REQUESTS, running, send  # noqa: E402

from dlma.cli import main  # noqa: E402


def run(case) -> tuple[int, str, str]:
    d = Path(tempfile.mkdtemp(prefix="dlma-bad-"))
    err = io.StringIO()
    with running(case, d) as argv, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    shown = " ".join(a.replace(str(d) + "/", "") for a in argv)
    said = err.getvalue().strip().replace(str(d) + "/", "")
    return rc, shown, re.sub(r"pid \d+ on [^)]*", "pid N on HOST", said)  # the lock's holder differs from run to run


def server_rows() -> list[str]:
    """A row per malformed request, from what a server on the embedded model answers."""
    from dlma.models import load_model
    from dlma.serve import ChatServer

    model, tok = load_model("embedded", "float32", "cpu")
    rows = []
    with ChatServer(model, tok, read_timeout=1.0) as srv:
        for req in REQUESTS:
            status, answer = send(srv.url, req)
            message = answer["error"]["message"]
            assert status == req.status and req.says in message, (req.what, status, message)
            rows.append(f"| {req.what} | {status} | `{message.replace('|', chr(92) + '|')}` |")
    return rows


def main_() -> None:
    rows = ["# Bad input: what dlma says", "",
            "Every malformed input below gives exactly one line on stderr and exit status 2; nothing is",
            "written (or a partial output is left as it was, to resume). Each row is a test",
            "(`tests/test_bad_input.py::test_catalogue`, cases in `tests/bad_inputs.py`); this page is",
            "written by `scripts/bad_input_table.py` from what the commands print.", "",
            "| kind | input | command | what dlma prints |", "|---|---|---|---|"]
    for case in CASES:
        rc, argv, err = run(case)
        assert rc == 2 and "\n" not in err and case.says in err, (case.what, rc, err)
        cell = lambda s: s.replace("|", "\\|")  # noqa: E731
        rows.append(f"| {case.kind} | {cell(case.what)} | `dlma {cell(argv)}` | `{cell(err)}` |")
    rows += ["", "## The chat server (`python -m dlma.serve`)", "",
             "Every malformed request gets a status and a JSON error (`{\"error\": {\"message\": ...}}`), and the server",
             "keeps serving (`tests/test_serve.py`, requests in `tests/bad_inputs.py`).", "",
             "| request | status | message |", "|---|---|---|"]
    rows += server_rows()
    rows += ["", "## Misuse that gets correct output", "",
             "These inputs are not errors: each gets the output a user expects, as its test shows.", "",
             "| kind | input | what dlma does | test |", "|---|---|---|---|"]
    rows += [f"| {h.kind} | {h.what} | {h.does} | `{h.test}` |" for h in HANDLED]
    (ROOT / "docs" / "bad-input.md").write_text("\n".join(rows) + "\n")
    print(f"{len(CASES)} cases, {len(REQUESTS)} requests, {len(HANDLED)} handled -> docs/bad-input.md")


if __name__ == "__main__":
    main_()
