"""Process settings every entry point applies before torch loads: threads that survive a busy machine.

torch's CPU wheel runs intra-op parallelism on GNU OpenMP (libgomp), whose idle threads spin for a while
before sleeping. On a 2-core machine with one core taken by another process, a spinning thread steals the
core its peer needs: the stage-2 tiny step went from 186 ms to 755 ms (4.1x) with one busy-looping process
beside it, and a longer spin (``GOMP_SPINCOUNT=100000``) to 3.25 s (15.7x). With ``OMP_WAIT_POLICY=PASSIVE``
idle threads sleep at once: 230 ms quiet, 362 ms busy (1.57x, a proportional slowdown), against 338 ms for one
thread (``benchmarks/threads.py``, docs/performance.md). So every entry point sets PASSIVE unless the user
chose a policy, and keeps one torch thread per core.

libgomp reads the variable once, when it is loaded, so :func:`cpu_thread_defaults` must run before the first
``import torch`` of the process (launchers call it first thing; subprocesses inherit the environment).
This module must therefore not import torch.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULTS = {
    "OMP_WAIT_POLICY": "PASSIVE",  # idle OpenMP threads sleep instead of spinning (busy-machine collapse)
    "TOKENIZERS_PARALLELISM": "false",  # HF tokenizers' own pool: loader workers fork after it is built
}
"""Environment defaults; a value the user already set is kept."""

AVX2_EMULATION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
"""Environment that makes any x86 CPU run, and be detected (``unimllm.precision``), as a plain AVX2 machine
without native bf16: torch's kernels, oneDNN's and MKL's limited to AVX2 (a bf16 matmul is then emulated,
~16x slower than fp32 here; docs/performance.md). ``make demo AVX2=1`` / ``launch/demo.py --emulate_avx2``."""


def cpu_thread_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`DEFAULTS` in ``environ`` (default ``os.environ``) where unset; returns what is now in force."""
    env = os.environ if environ is None else environ
    for key, value in DEFAULTS.items():
        env.setdefault(key, value)
    return {k: env[k] for k in DEFAULTS}
