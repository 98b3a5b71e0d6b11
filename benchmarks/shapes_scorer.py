"""Shapes scorer vs a naive fill-ratio baseline on clean, blurred and blurred+noisy renders.

    .venv/bin/python benchmarks/shapes_scorer.py [--n 300] [--n256 30] [--workers 2]
        [--out benchmarks/results/shapes_scorer.json]

For every image (demo and full levels, 64 px and 256 px val renders) and every degradation, both
detectors run once; "agree" is the strict test of eval.shapes_scorer.agrees (detected
(shape, colour) multiset == truth AND the image's own GenEval prompt scores True); "other prompt"
is whether the verdict on a random other prompt of the same tag equals GenEval's rules applied to
the ground truth. Blur sigmas are in pixels at 64 px and scale with the image side. The baseline
uses the same segmentation and swaps only the shape classifier for area / bbox-area thresholds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np

from data.shapes import render_scene
from data.shapes_config import preset
from data.shapes_text import sample_geneval_spec
from eval.shapes_scorer import ScorerConfig, degrade, detect, evaluate, truth_detections

CONDITIONS = {  # name: (blur sigma at 64 px, noise std on the 0-255 scale)
    "clean": (0.0, 0.0),
    "blur1": (1.0, 0.0),
    "blur1+noise": (1.0, 8.0),
    "blur1.5+noise": (1.5, 8.0),
    "blur2+noise": (2.0, 8.0),
}
METHODS = ("iou", "fill")


def _one(job: tuple[str, int, int]) -> dict:
    """All conditions x methods for one image: {(condition, method): (agree, other_ok, seconds)}."""
    level, size, i = job
    cfg = preset(level)
    cfg.image_size = size
    scene = render_scene(cfg, "val", i)
    rec = scene.record
    truth = Counter((o["shape"], o["color"]) for o in rec["objects"])
    other, _ = sample_geneval_spec(cfg, np.random.default_rng([7, i]), rec["geneval"]["tag"])
    other_truth = evaluate(truth_detections(rec["objects"]), other)[0]
    scorer = ScorerConfig()
    out = {}
    for cond, (sigma, noise) in CONDITIONS.items():
        img = degrade(scene.image, sigma * size / 64, noise, np.random.default_rng([size, i]))
        for method in METHODS:
            t0 = time.perf_counter()
            dets = detect(img, scorer, method)
            seconds = time.perf_counter() - t0
            found = Counter((d.shape, d.color) for ds in dets.values() for d in ds)
            agree = found == truth and evaluate(dets, rec["geneval"])[0]
            out[f"{cond}|{method}"] = (bool(agree), evaluate(dets, other)[0] == other_truth, seconds)
    return {"level": level, "size": size, "results": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="64-px images per level")
    ap.add_argument("--n256", type=int, default=30, help="256-px images per level")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="benchmarks/results/shapes_scorer.json")
    args = ap.parse_args()

    t0 = time.time()
    jobs = [(lv, size, i) for lv in ("demo", "full") for size, n in ((64, args.n), (256, args.n256)) for i in range(n)]
    with multiprocessing.get_context().Pool(args.workers) as pool:
        rows = pool.map(_one, jobs, chunksize=8)
    table = []
    for level in ("demo", "full"):
        for size in (64, 256):
            group = [r["results"] for r in rows if r["level"] == level and r["size"] == size]
            for key in group[0]:
                cond, method = key.split("|")
                vals = [g[key] for g in group]
                table.append({"level": level, "size": size, "condition": cond, "method": method, "n": len(vals),
                              "agree": round(sum(v[0] for v in vals) / len(vals), 4),
                              "other_prompt": round(sum(v[1] for v in vals) / len(vals), 4),
                              "ms_per_image": round(1000 * sum(v[2] for v in vals) / len(vals), 2)})
    summary = {}
    print(f"{'level':5} {'px':>4} {'condition':14} {'n':>4} {'ours':>7} {'fill':>7} {'ratio':>6} "
          f"{'other(ours)':>11} {'ms(ours)':>8}")
    for row in table:
        if row["method"] != "iou":
            continue
        base = next(r for r in table if r["method"] == "fill" and all(r[k] == row[k] for k in ("level", "size", "condition")))
        ratio = row["agree"] / max(base["agree"], 1e-9)
        summary[f"{row['level']}@{row['size']}/{row['condition']}"] = {
            "ours": row["agree"], "fill_baseline": base["agree"], "ratio": round(ratio, 3),
            "other_prompt_ours": row["other_prompt"], "other_prompt_fill": base["other_prompt"]}
        print(f"{row['level']:5} {row['size']:>4} {row['condition']:14} {row['n']:>4} {row['agree']:>7.1%} "
              f"{base['agree']:>7.1%} {ratio:>6.2f} {row['other_prompt']:>11.1%} {row['ms_per_image']:>8.1f}")
    result = {
        "benchmark": "shapes_scorer",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "args": vars(args),
        "conditions": {k: {"blur_sigma_at_64px": s, "noise_std": n} for k, (s, n) in CONDITIONS.items()},
        "summary": summary,
        "rows": table,
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(jobs)} images x {len(CONDITIONS)} conditions x {len(METHODS)} detectors in {result['seconds']}s -> {out}")


if __name__ == "__main__":
    main()
