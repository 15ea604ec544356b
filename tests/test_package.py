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
