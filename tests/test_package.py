"""The package as users get it: `python -m build` gives an sdist and a wheel that carry dlma's data files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_build_makes_a_wheel_with_presets_resources_configs_and_the_licence(tmp_path):
    pytest.importorskip("build")
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # no isolation: the build backend (setuptools, from the test extra) is the installed one, so no network is needed
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dlma-*.whl")
    assert list((tmp_path / "dist").glob("dlma-*.tar.gz"))  # the wheel was built from this sdist
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("dlma/presets/harmless.yaml", "dlma/presets/no-overrefusal.yaml", "dlma/configs/default.yaml",
                   "dlma/configs/accelerate/fsdp_8gpu.yaml", "dlma/resources/hh-rlhf-harmless-dev.jsonl.gz",
                   "dlma/resources/safety-test.jsonl", "dlma/resources/LICENSE-hh-rlhf.txt", "dlma/integrations/trl.py"):
        assert needed in names, needed
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = zipfile.ZipFile(wheel).read(info).decode()
    assert "License-Expression: Apache-2.0" in meta and any(n.endswith("licenses/LICENSE") for n in names)
    for extra in ("trl", "vllm", "hub", "lora", "tracking", "datasets"):
        assert f"Provides-Extra: {extra}" in meta, extra
    assert "Requires-Dist: transformers<6,>=5.0" in meta
    assert (ROOT / "LICENSE").read_text().startswith(" " * 33 + "Apache License")


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_second():
    """The README's first two commands set up a fresh machine (run the default job; run the tests),
    and CI runs the very test command the README gives; the README stays a guide (<= 300 lines)."""
    import re

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    run, tests = blocks[0].strip(), blocks[1].strip()
    assert run.startswith("bash scripts/install.sh && ") and run.endswith("dlma run")
    assert tests.startswith("bash scripts/install.sh && ") and "pytest tests" in tests
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1].strip() == tests
    assert len(readme.splitlines()) <= 300
