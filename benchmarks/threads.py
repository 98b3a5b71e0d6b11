"""Threads and OpenMP wait policy on a busy machine: the stage-2 tiny training step (fp32).

    .venv/bin/python benchmarks/threads.py [--batch 16] [--steps 12] [--out benchmarks/results/threads.json]

Each variant is a fresh subprocess (the OpenMP runtime reads ``OMP_WAIT_POLICY`` once, at start-up) that times
``--steps`` fp32 training steps of the stage-2 tiny model on synthetic batches (``benchmarks/train_step.py``'s
model and data), first on a quiet machine, then with one busy-looping process per ``--busy`` (default 1: one
core of a 2-core machine taken by something else, as on a user's laptop). Variants: 1 thread; all cores with
OpenMP's default wait (spin, then sleep); all cores with a shorter spin (``GOMP_SPINCOUNT``, libgomp: torch's
CPU wheel); all cores with ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once). Prints each variant's
median step time, its busy/quiet ratio and its ratio to the 1-thread quiet baseline measured in the same run;
writes JSON. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(batch: int, steps: int) -> None:
    """Runs in the subprocess: print the median fp32 step time (s) as JSON."""
    import torch
    from train_step import batches, build, run

    torch.manual_seed(0)
    evo, text, model = build("cpu")
    data = batches(evo, text, model, batch, steps + 3, "cpu")
    times, _ = run(model, data, False, "cpu")
    print(json.dumps({"step_s": statistics.median(times), "threads": torch.get_num_threads()}))


def busy_loop() -> subprocess.Popen:
    """One process spinning on one core (pure Python, no threads)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(threads: int, omp_env: dict[str, str], batch: int, steps: int, busy: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "benchmarks") + os.pathsep + str(ROOT)}
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(k, None)
    env.update(omp_env)
    loops = [busy_loop() for _ in range(busy)]
    try:
        time.sleep(0.2 if busy else 0)
        out = subprocess.run([sys.executable, __file__, "--worker", "--batch", str(batch), "--steps", str(steps)],
                             env=env, capture_output=True, text=True, check=True)
    finally:
        for p in loops:
            p.kill()
            p.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])["step_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--busy", type=int, default=1, help="busy-looping processes in the loaded runs")
    ap.add_argument("--spincounts", type=int, nargs="*", default=[1000, 10000, 100000],
                    help="libgomp spin counts tried before a waiting thread sleeps (default policy)")
    ap.add_argument("--out", default="benchmarks/results/threads.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.batch, args.steps)
    cores = len(os.sched_getaffinity(0))
    variants = [("1 thread", 1, {}), (f"{cores} threads, default wait", cores, {})]
    variants += [(f"{cores} threads, GOMP_SPINCOUNT={n}", cores, {"GOMP_SPINCOUNT": str(n)}) for n in args.spincounts]
    variants.append((f"{cores} threads, OMP_WAIT_POLICY=PASSIVE", cores, {"OMP_WAIT_POLICY": "PASSIVE"}))
    res = {}
    for name, threads, omp_env in variants:
        quiet = measure(threads, omp_env, args.batch, args.steps, 0)
        loaded = measure(threads, omp_env, args.batch, args.steps, args.busy)
        res[name] = {"threads": threads, "omp_env": omp_env, "quiet_step_s": quiet, "busy_step_s": loaded}
    base = res["1 thread"]["quiet_step_s"]
    print(f"{'variant':40s} {'quiet ms':>9s} {'busy ms':>9s} {'busy/quiet':>10s} {'quiet vs 1 thr':>14s} {'busy vs 1 thr quiet':>19s}")
    for name, r in res.items():
        r["busy_over_quiet"] = r["busy_step_s"] / r["quiet_step_s"]
        r["quiet_speedup_vs_1_thread"] = base / r["quiet_step_s"]
        r["busy_vs_1_thread_quiet"] = r["busy_step_s"] / base
        print(f"{name:40s} {r['quiet_step_s'] * 1e3:9.1f} {r['busy_step_s'] * 1e3:9.1f} {r['busy_over_quiet']:10.2f} "
              f"{r['quiet_speedup_vs_1_thread']:14.2f} {r['busy_vs_1_thread_quiet']:19.2f}")
    isa = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    out = {"benchmark": "threads", "batch": args.batch, "steps": args.steps, "busy_processes": args.busy, "cores": cores,
           "machine": platform.processor() or platform.machine(), "isa_env": isa, "results": res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
