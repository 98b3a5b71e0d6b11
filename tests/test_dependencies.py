"""Declared dependencies are exactly the imported ones, and every installed module imports.

The imports of every module of the installed packages (read from the source, lazy ones included) are mapped to
their distributions (``importlib.metadata.packages_distributions``). Each must be a runtime dependency in
pyproject.toml or sit in an optional extra; each runtime dependency must be imported by some module.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = PYPROJECT["tool"]["setuptools"]["packages"]
TOPS = {p.split(".")[0] for p in PACKAGES}
NOT_INSTALLED_HERE = {"lmms_eval": "lmms-eval"}  # optional extras' import names -> distribution


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg.replace(".", "/")).glob("*.py"))


def imported_distributions() -> dict[str, set[str]]:
    """distribution -> the files importing it."""
    dists = md.packages_distributions()
    out: dict[str, set[str]] = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - TOPS - set(sys.stdlib_module_names):
                found = dists.get(top) or [NOT_INSTALLED_HERE.get(top, f"<unknown module {top}>")]
                for dist in found:
                    out.setdefault(canonical(dist), set()).add(str(path.relative_to(ROOT)))
    return out


def test_declared_dependencies_equal_imported():
    declared = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {requirement_name(r) for reqs in PYPROJECT["project"]["optional-dependencies"].values() for r in reqs}
    imported = imported_distributions()
    undeclared = {d: sorted(f) for d, f in imported.items() if d not in declared | extras}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = declared - set(imported)
    assert not unused, f"declared but imported by no installed module: {sorted(unused)}"


def test_every_installed_module_imports():
    """Each module of each installed package imports in a fresh interpreter (no missing dependency, no cycle)."""
    names = []
    for path in modules():
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint(len(sys.argv) - 1)"
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) == len(names) > 50
