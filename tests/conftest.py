"""Shared test helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def deepspeed_launch(script: Path, argv: list[str], port: int, timeout: int = 600) -> None:
    """Run ``deepspeed --num_accelerators 2 script argv`` on the CPU (gloo) and assert it succeeded."""
    ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert ds, "the deepspeed launcher is not installed next to this python"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    cmd = [ds, "--num_accelerators", "2", "--master_port", str(port), str(script), *argv]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
