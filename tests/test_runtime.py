"""Every entry point sets the OpenMP wait policy (PASSIVE unless the user chose one) before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unimllm.runtime import DEFAULTS, cpu_thread_defaults

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["launch/stage1.py", "launch/stage2.py", "launch/stage3.py", "launch/evaluate.py", "launch/teacher.py",
                "unimllm/stages/cli.py"]
MODULE_COMMANDS = ["unimllm.stages.precompute_codes", "unimllm.stages.cell_probe"]


def test_defaults_keep_what_the_user_set():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert cpu_thread_defaults(env) == {"OMP_WAIT_POLICY": "ACTIVE", "TOKENIZERS_PARALLELISM": "false"}
    assert cpu_thread_defaults({}) == DEFAULTS


def _policy_seen_by_torch(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter without OMP_WAIT_POLICY; print the policy in force when torch loaded."""
    probe = ("import sys, os\n"
             "class Watch:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch' and 'seen' not in globals(): globals()['seen'] = os.environ.get('OMP_WAIT_POLICY')\n"
             "        return None\n"
             "sys.meta_path.insert(0, Watch())\n" + code + "\nprint(globals().get('seen'), os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()[-2:]


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_entry_points_set_the_policy_before_torch(path):
    code = f"import runpy; runpy.run_path({path!r}, run_name='entry')\nimport torch"
    assert _policy_seen_by_torch(code) == ["PASSIVE", "PASSIVE"]


@pytest.mark.parametrize("module", MODULE_COMMANDS)
def test_module_commands_set_the_policy_before_torch(module):
    code = f"import runpy, sys; sys.argv = ['x', '--help']\ntry:\n    runpy.run_module({module!r}, run_name='__main__')\nexcept SystemExit:\n    pass"
    assert _policy_seen_by_torch(code) == ["PASSIVE", "PASSIVE"]
