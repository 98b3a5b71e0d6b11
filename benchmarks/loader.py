"""Loader throughput vs raw PIL decode of the same images, on one core.

    python benchmarks/loader.py                       # synthetic 256-px JPEG + 64-px PNG shards
    python benchmarks/loader.py --shards "runs/shapes/demo/train/*.tar"

Baseline: the images extracted to plain files, each opened and fully decoded to RGB by PIL in a
loop (torch and PIL pinned to one thread). Loader: ``StreamingLoader`` over the tar shards with
``num_workers=0`` (everything in this one process: tar read, decode, json parse, schema checks,
crop/flip, tensor conversion, collate) and with ``num_workers=1`` (one worker process doing the
decoding), each with ``read_json`` off (images only: the like-for-like comparison, what the tokenizer
stage reads) and on (json parsed and schema-checked too). Loader figures are steady-state (after the first batch); the time to the first batch
(worker start-up) is reported separately, as is the one-off shard indexing. Prints images/s and the
ratio loader/raw (goal >= 0.9) and writes JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.config import DataConfig, ImageConfig, SourceConfig
from data.loader import StreamingLoader
from data.schema import IMAGE_EXTS, make_sample
from data.shard_writer import ShardWriter
from data.tar_index import iter_shard


def synthetic_shards(root: Path, n: int, side: int, ext: str) -> list[str]:
    """Smooth random images (gradients + blobs + mild noise: realistic compressed sizes)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    with ShardWriter(str(root / f"{ext}{side}-%04d.tar"), max_samples=500) as w:
        for i in range(n):
            c = rng.uniform(0, 255, (3, 3))
            img = c[:, 0, None, None] * xx + c[:, 1, None, None] * yy + c[:, 2, None, None] * (1 - xx) * yy
            img = img.transpose(1, 2, 0) + rng.normal(0, 6, (side, side, 3))
            arr = np.clip(img, 0, 255).astype(np.uint8)
            w.write(make_sample(f"s{i:06d}", Image.fromarray(arr), {"caption": f"image {i}"}, ext=ext))
    return w.written


def extract_images(shards: list[str], out: Path) -> list[Path]:
    files = []
    for shard in shards:
        for s in iter_shard(shard):
            ext = next(e for e in IMAGE_EXTS if e in s)
            p = out / f"{len(files):07d}.{ext}"
            p.write_bytes(s[ext])
            files.append(p)
    return files


def raw_decode(files: list[Path]) -> float:
    t = time.perf_counter()
    for p in files:  # the minimum any loader must do: open, decode fully, ensure RGB
        im = Image.open(p)
        im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")
    return len(files) / (time.perf_counter() - t)


def loader_rate(shards: list[str], resolution: int, workers: int, batch: int, read_json: bool) -> tuple[float, float]:
    """(steady-state images/s after the first batch, seconds to the first batch incl. worker start-up)."""
    cfg = DataConfig(sources=[SourceConfig(shards="::".join(shards))], batch_size=batch, num_workers=workers,
                     shuffle_buffer=256, read_json=read_json,
                     image=ImageConfig(resolution=resolution, crop="center"))
    loader = StreamingLoader(cfg)  # indexing is one-off start-up work, timed separately in bench()
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = sum(len(b["__key__"]) for b in it)
    return n / (time.perf_counter() - t1), t1 - t0


def bench(name: str, shards: list[str], workdir: Path, batch: int, repeats: int) -> dict:
    files = extract_images(shards, workdir)
    with Image.open(files[0]) as im:
        resolution = min(im.size)
    raw = max(raw_decode(files) for _ in range(repeats))
    t = time.perf_counter()
    StreamingLoader(DataConfig(sources=[SourceConfig(shards="::".join(shards))]))
    index_s = time.perf_counter() - t
    res = {"name": name, "images": len(files), "resolution": resolution, "raw_pil_images_per_s": raw,
           "index_seconds": index_s}
    for read_json in (False, True):
        tag = "json" if read_json else "image"
        for workers in (0, 1):
            runs = [loader_rate(shards, resolution, workers, batch, read_json) for _ in range(repeats)]
            rate = max(r[0] for r in runs)
            res[f"{tag}_w{workers}_images_per_s"] = rate
            res[f"{tag}_ratio_w{workers}"] = rate / raw
            res[f"{tag}_first_batch_seconds_w{workers}"] = min(r[1] for r in runs)
        print(f"[{name}] {len(files)} images {resolution}px | raw PIL decode {raw:7.0f} img/s | loader ({tag:5s}) "
              f"in-process {res[f'{tag}_w0_images_per_s']:7.0f} img/s ratio {res[f'{tag}_ratio_w0']:.3f} | "
              f"1 worker {res[f'{tag}_w1_images_per_s']:7.0f} img/s ratio {res[f'{tag}_ratio_w1']:.3f} | "
              f"first batch {res[f'{tag}_first_batch_seconds_w0']:.3f}s / {res[f'{tag}_first_batch_seconds_w1']:.3f}s"
              f" | index {index_s:.2f}s", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="glob or '::'-joined list of existing shards (default: synthetic sets)")
    ap.add_argument("--n", type=int, default=2000, help="synthetic images per set")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings for each figure")
    ap.add_argument("--out", default="benchmarks/results/loader.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one core for both sides of the ratio
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.shards:
            shards = sorted(p for part in args.shards.split("::") for p in glob.glob(part))
            if not shards:
                print(f"--shards {args.shards!r} matches no file", file=sys.stderr)
                return 2
            (tmp / "x").mkdir()
            results.append(bench("given", shards, tmp / "x", args.batch, args.repeats))
        else:
            for side, ext in ((256, "jpg"), (64, "png")):
                d = tmp / f"{ext}{side}"
                d.mkdir()
                shards = synthetic_shards(d, args.n, side, ext)
                (d / "files").mkdir()
                results.append(bench(f"{ext}-{side}px", shards, d / "files", args.batch, args.repeats))
    out = {"benchmark": "loader", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                              "torch": torch.__version__, "python": sys.version.split()[0]},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
