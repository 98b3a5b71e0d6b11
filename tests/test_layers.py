"""The layer diagram (README "Layout"), enforced: every import of every installed module runs downwards.

    unimllm.stages          composition: stage tasks, pipeline, validators, CLI, artifacts, evaluation
        |
    tokenizer    llm    eval ---> data        models and benchmarks
        |         |       |        |
    unimllm                                   the core: config, distributed, checkpoint, files, logging, trainer

Imports are read from the source (AST), lazy ones inside functions included, so a violation is found whether
or not the code path runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("unimllm", "tokenizer", "llm", "data", "eval")
COMPOSITION = "unimllm.stages"
ALLOWED = {  # layer -> the layers it may import (besides itself)
    "core": set(),
    "data": {"core"},
    "eval": {"core", "data"},
    "tokenizer": {"core"},
    "llm": {"core"},
    COMPOSITION: {"core", "data", "eval", "tokenizer", "llm"},
}


def layer(module: str) -> str | None:
    """The layer of a dotted module name of ours, None for a third-party or standard-library module."""
    if module == COMPOSITION or module.startswith(COMPOSITION + "."):
        return COMPOSITION
    top = module.split(".")[0]
    if top == "unimllm":
        return "core"
    return top if top in PACKAGES else None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``; relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            if layer(mod) != COMPOSITION:  # `from unimllm import stages` names the composition layer too
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if layer(f"{mod}.{a.name}") == COMPOSITION]
    return out


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            own = layer(module_name(path, root))
            for line, mod in imports(path, root):
                target = layer(mod)
                if target is not None and target != own and target not in ALLOWED[own]:
                    found.append(f"{path.relative_to(root)}:{line}: {own} imports {mod} ({target})")
    return found


def test_every_import_runs_downwards():
    assert violations() == []


@pytest.mark.parametrize("source, target", [
    ("tokenizer/model.py", "from eval.metrics import psnr"),
    ("data/loader.py", "from tokenizer.model import EvoTokenizer"),
    ("eval/mme.py", "from unimllm.stages.pipeline import UnifiedPipeline"),
    ("unimllm/trainer.py", "import llm.model"),
    ("llm/model.py", "from data.schema import SampleError"),
])
def test_an_upward_import_is_found(tmp_path, source, target):
    """A copy of the tree with one upward import added (inside a function, as lazy imports are) fails."""
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            dest = tmp_path / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(path.read_text())
    assert violations(tmp_path) == []
    with open(tmp_path / source, "a") as f:
        f.write(f"\n\ndef _upward():\n    {target}\n")
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{source}:") and target.split()[1] in found[0]


def test_the_core_imports_without_any_model_package():
    """Every core module imports in an interpreter where tokenizer, llm, data, eval and unimllm.stages cannot."""
    import subprocess
    import sys

    core = sorted(module_name(p) for p in (ROOT / "unimllm").glob("*.py"))
    code = (
        "import importlib, importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tokenizer', 'llm', 'data', 'eval') or name.startswith('unimllm.stages'):\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "for n in sys.argv[1:]:\n"
        "    importlib.import_module(n)\n"
        "print(len(sys.argv) - 1)\n")
    out = subprocess.run([sys.executable, "-c", code, *core], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) == len(core) >= 10
