"""bf16 vs fp32 matmuls on this CPU, natively and under the AVX2 emulation, and what ``precision: auto`` picks.

    .venv/bin/python benchmarks/precision.py [--out benchmarks/results/precision.json]

Times a 2816x128 @ 128x512 matmul (the tiny stage-2 model's MLP shape) in fp32, bf16 and under
``torch.autocast(bfloat16)``, one thread, median of 20, in two fresh subprocesses: as the machine is, and with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` (a plain AVX2 CPU without
native bf16). Prints each variant's bf16/fp32 ratio (the baseline is fp32 in the same process) and the
precision ``train.precision: auto`` resolves to there; writes JSON. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker() -> None:
    import statistics
    import time

    import torch

    from unimllm.precision import native_bf16, resolve_train_precision

    torch.set_num_threads(1)
    a, b = torch.randn(2816, 128), torch.randn(128, 512)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    ab, bb = a.bfloat16(), b.bfloat16()

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return a @ b

    res = {"fp32_ms": 1e3 * timed(lambda: a @ b), "bf16_ms": 1e3 * timed(lambda: ab @ bb),
           "autocast_ms": 1e3 * timed(autocast), "capability": str(torch.backends.cpu.get_cpu_capability()),
           "native_bf16": native_bf16("cpu")[0], "auto_resolves_to": resolve_train_precision("auto", "cpu")[0],
           "reason": native_bf16("cpu")[1]}
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker()
    from unimllm.runtime import AVX2_EMULATION

    base = {k: v for k, v in os.environ.items() if k not in (*AVX2_EMULATION, "UNIMLLM_NATIVE_BF16")}
    base["PYTHONPATH"] = str(ROOT)
    out = {}
    for name, extra in (("native", {}), ("avx2_emulation", AVX2_EMULATION)):
        run = subprocess.run([sys.executable, __file__, "--worker"], env={**base, **extra}, capture_output=True,
                             text=True, check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        r["bf16_over_fp32"] = r["bf16_ms"] / r["fp32_ms"]
        r["autocast_over_fp32"] = r["autocast_ms"] / r["fp32_ms"]
        out[name] = r
        print(f"{name:15s} kernels {r['capability']:7s} fp32 {r['fp32_ms']:7.2f} ms  bf16 {r['bf16_ms']:7.2f} ms "
              f"({r['bf16_over_fp32']:5.1f}x fp32)  autocast {r['autocast_ms']:7.2f} ms ({r['autocast_over_fp32']:5.1f}x)  "
              f"auto -> {r['auto_resolves_to']}")
    doc = {"benchmark": "precision", "shape": [2816, 128, 512], "threads": 1,
           "machine": platform.processor() or platform.machine(), "results": out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
