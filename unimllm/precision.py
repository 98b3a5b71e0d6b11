"""Precision chosen by the hardware: ``auto`` runs bf16 only where the device computes bf16 natively.

A CPU without AVX512_BF16 or AMX (every AMD CPU before Zen 4, most Intel client CPUs, most cloud VMs)
emulates a bf16 matmul: 2816x128 @ 128x512 took 274 ms in bf16 against 2.4 ms in fp32 on a Zen 3 VM, so a
bf16-autocast demo there ran ~16x slower than fp32. ``auto`` therefore resolves to:

- training (``train.precision``): ``bf16-autocast`` on a CUDA device with bf16 or a CPU with native bf16
  matmuls, ``fp32`` otherwise;
- evaluation and sampling (weights dtype): ``bf16`` on CUDA with bf16, ``fp32`` elsewhere. On a CPU the
  tiny models' evaluation is cheap and bf16 weights would change the numbers between machines.

A CPU counts as native when its flags (``/proc/cpuinfo``) have AVX512_BF16 or AMX_BF16 **and** the kernels torch may use are not
limited below that: ``ATEN_CPU_CAPABILITY`` (torch's own dispatch, read through
``torch.backends.cpu.get_cpu_capability()``) and ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` (oneDNN, which runs
CPU bf16 matmuls). So ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` on any
x86 CPU behaves, and is detected, as a plain AVX2 machine (docs/performance.md: bf16 matmuls there are
~16x slower than fp32). ``UNIMLLM_NATIVE_BF16=1`` / ``0`` overrides the detection (tests, odd machines).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from unimllm.runtime import AVX2_EMULATION  # noqa: F401  (re-exported: the emulation belongs with the rule)

FORCE_ENV = "UNIMLLM_NATIVE_BF16"
"""Set to 1 or 0 to override the native-bf16 detection (a test hook; also for machines it gets wrong)."""


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) that still allow its native bf16 kernels.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_", "AVX2_VNNI_2", "ALL", "DEFAULT")


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The native-bf16 CPU flags the kernel reports (``avx512_bf16``, ``amx_bf16``); none where unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f.upper() for f in ("avx512_bf16", "amx_bf16") if f in flags]


def _cpu_bf16() -> tuple[bool, str]:
    flags = cpu_bf16_flags()
    if not flags:
        return False, "CPU has neither AVX512_BF16 nor AMX: bf16 matmuls would be emulated (~16-100x slower than fp32)"
    capability = str(torch.backends.cpu.get_cpu_capability())
    if "AVX512" not in capability and "AMX" not in capability:
        return False, (f"CPU has {'+'.join(flags)} but torch's kernels are limited to {capability} "
                       "(ATEN_CPU_CAPABILITY): bf16 matmuls would be emulated")
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = os.environ.get(var, "").strip().upper()
        if isa and not isa.startswith(_BF16_ISAS):
            return False, f"CPU has {'+'.join(flags)} but {var}={isa} limits oneDNN below bf16: bf16 would be emulated"
    return True, f"CPU computes bf16 natively ({'+'.join(flags)}, torch kernels {capability})"


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 matmuls natively, and why (one line, for the logs)."""
    forced = os.environ.get(FORCE_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{FORCE_ENV}={forced}"
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"CUDA device {'supports' if ok else 'does not support'} bf16"
    if device.type == "cpu":
        return _cpu_bf16()
    return False, f"no native-bf16 rule for device type {device.type!r}"


def resolve_train_precision(requested: str, device: torch.device | str) -> tuple[str, str]:
    """``train.precision`` to use on ``device`` and the reason: ``auto`` -> bf16-autocast where bf16 is native,
    else fp32; anything else is kept as asked."""
    if requested != "auto":
        return requested, "asked for explicitly"
    ok, why = native_bf16(device)
    return ("bf16-autocast" if ok else "fp32"), f"auto: {why}"


def resolve_eval_precision(requested: str, device: torch.device | str) -> tuple[str, str]:
    """Evaluation/sampling weights dtype name: ``auto`` -> bf16 on a CUDA device with bf16, else fp32."""
    if requested != "auto":
        return requested, "asked for explicitly"
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32", f"auto: fp32 on {device.type} (bf16 weights would change the numbers between CPUs)"
    ok, why = native_bf16(device)
    return ("bf16" if ok else "fp32"), f"auto: {why}"
