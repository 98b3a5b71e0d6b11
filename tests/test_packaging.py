"""Packaging guardrails: our five top-level packages resolve to this checkout, from any directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("unimllm", "tokenizer", "llm", "data", "eval")
PROBE = (
    "import importlib, json, sys; "
    "print(json.dumps({p: importlib.import_module(p).__file__ for p in sys.argv[1:]}))"
)


def resolve_from(cwd: Path, extra_path: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    out = subprocess.run([sys.executable, "-c", PROBE, *PACKAGES], cwd=cwd, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def outside_checkout(files: dict[str, str]) -> dict[str, str]:
    return {p: f for p, f in files.items() if ROOT not in Path(f).resolve().parents}


def test_packages_resolve_inside_checkout_from_elsewhere(tmp_path):
    files = resolve_from(tmp_path)
    assert not outside_checkout(files), f"shadowed by another installation: {outside_checkout(files)}"


def test_shadowing_is_detected(tmp_path):
    """The check above really catches a foreign `llm`/`tokenizer` package earlier on the path."""
    for name in ("llm", "tokenizer"):
        (tmp_path / "foreign" / name).mkdir(parents=True)
        (tmp_path / "foreign" / name / "__init__.py").write_text("")
    files = resolve_from(tmp_path, extra_path=str(tmp_path / "foreign"))
    assert set(outside_checkout(files)) == {"llm", "tokenizer"}


def test_launch_and_tests_are_not_installed(tmp_path):
    """Outside the checkout, `launch` and `tests` are not importable from our installation."""
    probe = ("import importlib.util, json; "
             "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) for n in ('launch', 'tests')}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    found = {n: o for n, o in json.loads(out.stdout).items() if o and ROOT in Path(o).resolve().parents}
    assert not found, f"installed from the checkout: {found}"


def test_no_torchvision_installed():
    import importlib.util

    assert importlib.util.find_spec("torchvision") is None


def test_cpu_machines_use_the_pinned_torch():
    import torch

    if torch.cuda.is_available():
        pytest.skip("GPU machine: torch is not pinned")
    assert torch.__version__ == (ROOT / "constraints/cpu.txt").read_text().split("torch==")[1].split()[0]
