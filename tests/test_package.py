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


def _module_imports(path: Path, package: str) -> list[tuple[str, list[str]]]:
    """(module, names) of every dlma module a file imports at module level (not inside functions or
    TYPE_CHECKING): the imports that run when the file is imported, where a cycle would bite."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, list[str]]] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        for n in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ():
            if isinstance(n, ast.ImportFrom):
                base = package.split(".")
                if n.level:
                    base = base[:len(base) - n.level + 1]
                    mod = ".".join(base + ([n.module] if n.module else []))
                else:
                    mod = n.module or ""
                if mod.startswith("dlma"):
                    out.append((mod, [a.name for a in n.names]))
            elif isinstance(n, ast.Import):
                out += [(a.name, []) for a in n.names if a.name.startswith("dlma")]
    return out


def test_the_package_has_no_import_cycle_and_no_module_takes_anothers_private_name():
    """Modules import each other at module level without a cycle, and none imports a name another keeps private."""
    src = ROOT / "src"
    modules = {}
    for path in sorted((src / "dlma").rglob("*.py")):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        is_pkg = path.name == "__init__.py"
        name = name.removesuffix(".__init__")
        modules[name] = (path, name if is_pkg else name.rpartition(".")[0])
    graph: dict[str, set[str]] = {}
    private = []
    for name, (path, package) in modules.items():
        deps = set()
        for mod, names in _module_imports(path, package):
            for n in names:
                if f"{mod}.{n}" in modules:
                    deps.add(f"{mod}.{n}")  # `from . import x` names a module
                elif n.startswith("_") and not n.startswith("__"):
                    private.append(f"{name} imports {mod}.{n}")
            if mod in modules:
                deps.add(mod)
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}  # a package's own __init__
    assert not private, private
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(dep):] + [node, dep]) if dep in trail
                                     else f"import cycle through {node} -> {dep}")
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
