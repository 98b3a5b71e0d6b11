"""Shard building throughput (``data.build_shards``) against a raw decode + re-encode bound, per core and on all cores.

    python benchmarks/build_shards.py [--n 1500] [--side 256] [--out benchmarks/results/build_shards.json]

Input: ``--n`` synthetic ``--side``-px JPEGs (gradients + blobs + mild noise: realistic compressed sizes) in
a folder with a ``.txt`` caption each. Two builds:

- ``keep``: the images are stored as they are (decoded once for the schema check, bytes copied);
- ``reencode``: ``--max_side`` 7/8 of the side: every image decoded, resized and re-encoded as JPEG q95.

Bound, measured in this run in one process: PIL reads each file and decodes it fully (``keep``), and also
resizes and encodes it (``reencode``); the all-core bound is that rate times the cores used. The builder is run
with ``--workers 1`` (per core: its worker does the decode while the main process writes, so it may exceed one
core's bound by the writer's share) and with every core. Prints images/s and build / bound, writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data.build_shards import build


def make_images(root: Path, n: int, side: int) -> list[Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    files = []
    for i in range(n):
        c = rng.uniform(0, 255, (3, 3))
        img = c[:, 0, None, None] * xx + c[:, 1, None, None] * yy + c[:, 2, None, None] * (1 - xx) * yy
        img = img.transpose(1, 2, 0) + rng.normal(0, 6, (side, side, 3))
        p = root / f"img{i:06d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        p.with_suffix(".txt").write_text(f"image {i}")
        files.append(p)
    return files


def bound(files: list[Path], max_side: int) -> float:
    """Images/s of one process: read + full decode (+ resize + JPEG encode when ``max_side``)."""
    t0 = time.perf_counter()
    for p in files:
        with Image.open(io.BytesIO(p.read_bytes())) as im:
            rgb = im.convert("RGB")
        if max_side:
            rgb = rgb.resize((max_side, max_side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=95)
    return len(files) / (time.perf_counter() - t0)


def cpu_name() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/build_shards.json")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        (tmp / "in").mkdir()
        files = make_images(tmp / "in", args.n, args.side)
        results = {}
        for mode, max_side in (("keep", 0), ("reencode", args.side * 7 // 8)):
            b1 = bound(files, max_side)
            row = {"bound_1core": b1, "bound_all": b1 * cores}
            for workers in sorted({1, cores}):
                out = tmp / f"out-{mode}-{workers}"
                t0 = time.perf_counter()
                s = build(tmp / "in", out / "s-%04d.tar", shard_samples=500, max_side=max_side, workers=workers)
                rate = s.samples / (time.perf_counter() - t0)
                assert s.samples == args.n and not s.skipped
                row[f"build_{workers}w"] = rate
                shutil.rmtree(out)
            row["ratio_1core"] = row["build_1w"] / b1
            row[f"ratio_all_{cores}"] = row[f"build_{cores}w"] / row["bound_all"]
            results[mode] = row
            print(f"{mode:9s} bound {b1:7.1f} img/s/core ({row['bound_all']:.1f} on {cores} cores) | build: "
                  f"1 worker {row['build_1w']:7.1f} ({row['ratio_1core']:.2f} of one core's bound), {cores} workers "
                  f"{row[f'build_{cores}w']:7.1f} ({row[f'ratio_all_{cores}']:.2f} of the all-core bound)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {"benchmark": "build_shards", "n": args.n, "side": args.side, "cores": cores,
              "machine": cpu_name(), "python": sys.version.split()[0],
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
