"""Write docs/bad-input.md: every case of tests/bad_inputs.py, run for real, with the line it prints.

    .venv/bin/python scripts/bad_input_table.py      # rewrites docs/bad-input.md
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bad_inputs import CASES, materialise  # noqa: E402

from dlma.cli import main  # noqa: E402


def run(case) -> tuple[int, str, str]:
    d = Path(tempfile.mkdtemp(prefix="dlma-bad-"))
    argv = materialise(case, d)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    shown = " ".join(a.replace(str(d) + "/", "") for a in argv)
    return rc, shown, err.getvalue().strip().replace(str(d) + "/", "")


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
    (ROOT / "docs" / "bad-input.md").write_text("\n".join(rows) + "\n")
    print(f"{len(CASES)} cases -> docs/bad-input.md")


if __name__ == "__main__":
    main_()
