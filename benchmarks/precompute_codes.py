"""What stage 2 pays per batch for its image inputs: tokenizer encode on the fly vs precomputed codes.

    python benchmarks/precompute_codes.py
    python benchmarks/precompute_codes.py --tokenizer DIR --shards 'shards/train-{000000..000003}.tar'

Baseline (a), on the fly: ``StreamingLoader`` (``num_workers=0``, images only) decodes and center-crops
each image from the input shards at the tokenizer's resolution, then ``normalize`` ->
``tokenizer.encode`` -> ``tokenizer.semantic_features(codes)``. Candidate (b), precomputed: the same
shards are first written once with ``codes.npy`` by :func:`unimllm.stages.precompute_codes.precompute` into a
temporary folder (timed separately: the one-off cost); then ``StreamingLoader`` with a codes-only map
function reads the codes and ``tokenizer.semantic_features(codes)`` runs. Everything in one process on
``--threads`` torch threads (default 1). Figures are the best of ``--repeats`` full passes; the data and
model shares of each are reported too. Prints images/s of both and the ratio b/a, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data.config import DataConfig, ImageConfig, SourceConfig
from data.loader import SampleContext, StreamingLoader, expand_shards
from data.schema import BAD_CODES, SampleError, sample_codes
from data.transforms import normalize
from tokenizer.model import EvoTokenizer
from unimllm.stages.precompute_codes import precompute


def codes_only(raw: dict, ctx: SampleContext) -> dict:
    """Map function of the precomputed path: the codes (h, w, L_sem) int64, no image decode."""
    codes = sample_codes(raw)
    if codes is None:
        raise SampleError(BAD_CODES, "no codes.npy member")
    return {"__key__": raw["__key__"], "codes": codes.astype(np.int64)}


def run_pass(loader: StreamingLoader, tok: EvoTokenizer, precomputed: bool) -> dict[str, float]:
    """One full epoch; returns images, seconds, and the data (loader) vs model split."""
    n, data_s, model_s = 0, 0.0, 0.0
    t = time.perf_counter()
    for batch in loader:
        t1 = time.perf_counter()
        with torch.no_grad():
            if precomputed:
                codes = batch["codes"]  # (B, h, w, L_sem) int64
            else:
                codes = tok.encode(normalize(batch["image"]))  # (B, 3, R, R) -> (B, h, w, L_sem)
            feats = tok.semantic_features(codes)  # (B, N, C_t)
        t2 = time.perf_counter()
        data_s += t1 - t
        model_s += t2 - t1
        n += feats.shape[0]
        t = time.perf_counter()
    return {"images": n, "seconds": data_s + model_s, "data_seconds": data_s, "model_seconds": model_s}


def best(loader: StreamingLoader, tok: EvoTokenizer, precomputed: bool, repeats: int) -> dict[str, float]:
    runs = [run_pass(loader, tok, precomputed) for _ in range(repeats)]
    r = min(runs, key=lambda x: x["seconds"])
    return {**r, "images_per_s": r["images"] / r["seconds"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="runs/stage1/tiny/export/tokenizer", help="save_pretrained directory")
    ap.add_argument("--shards", default="runs/shapes/demo/train/shapes-train-000000.tar",
                    help="input shards: brace pattern(s) joined by '::'")
    ap.add_argument("--batch", type=int, default=32, help="stage-2 batch size (loader and model)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N passes for each figure")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    ap.add_argument("--out", default="benchmarks/results/precompute_codes.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shards = expand_shards(args.shards)
    for what, path in [("--tokenizer", Path(args.tokenizer) / "model.safetensors"), *(("--shards", Path(s)) for s in shards)]:
        if not path.is_file():
            print(f"{what}: {path} not found", file=sys.stderr)
            return 2
    tok = EvoTokenizer.from_pretrained(args.tokenizer, with_teacher=False)  # eval mode, CPU
    res = tok.cfg.encoder.image_size

    def loader(spec: str, map_fn=None) -> StreamingLoader:
        cfg = DataConfig(sources=[SourceConfig(shards=spec)], batch_size=args.batch, num_workers=0,
                         shuffle_buffer=256, read_json=False, image=ImageConfig(resolution=res, crop="center"))
        return StreamingLoader(cfg, map_fn=map_fn)

    with tempfile.TemporaryDirectory() as tmp:
        pre = precompute(args.tokenizer, shards, tmp, batch_size=64, device="cpu")
        out_shards = "::".join(str(Path(tmp) / Path(s).name) for s in shards)
        a = best(loader(args.shards), tok, False, args.repeats)
        b = best(loader(out_shards, codes_only), tok, True, args.repeats)
        in_bytes = sum(os.path.getsize(s) for s in shards)
        out_bytes = sum(os.path.getsize(Path(tmp) / Path(s).name) for s in shards)
    ratio = b["images_per_s"] / a["images_per_s"]
    for tag, r in (("on the fly ", a), ("precomputed", b)):
        print(f"{tag}: {r['images_per_s']:7.0f} img/s  ({r['images']} images in {r['seconds']:.2f}s: "
              f"data {r['data_seconds']:.2f}s, model {r['model_seconds']:.2f}s)")
    print(f"speed-up precomputed / on the fly: {ratio:.2f}x  | one-off precompute: {pre['images_per_s']:.0f} img/s "
          f"| shards {in_bytes / 1e6:.1f} MB -> {out_bytes / 1e6:.1f} MB")
    out = {"benchmark": "precompute_codes", "tokenizer": args.tokenizer, "shards": shards, "batch": args.batch,
           "threads": args.threads, "resolution": res, "on_the_fly": a, "precomputed": b, "ratio": ratio,
           "precompute_images_per_s": pre["images_per_s"], "shard_bytes_in": in_bytes, "shard_bytes_out": out_bytes,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "python": sys.version.split()[0]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
