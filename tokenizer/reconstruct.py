"""Reconstruct images through a trained tokenizer and report PSNR / SSIM.

    python -m tokenizer.reconstruct --ckpt runs/stage1/tiny/export/tokenizer --images DIR --out DIR [--depth 4]

``--ckpt`` is a standalone tokenizer directory (``save_pretrained``: the stage-1 export) or a stage-1 run
directory (its ``export/tokenizer`` is used). Images are center-cropped to the tokenizer's resolution (ADM
crop), encoded, decoded from the first ``--depth`` stages (default L_pix) and written as PNG; per-image and
mean PSNR / SSIM (standard and LlamaGen convention) go to stdout and ``<out>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data.schema import decode_image
from data.transforms import center_crop, normalize, to_pil, to_uint8
from eval.metrics import psnr, ssim, ssim_llamagen
from tokenizer.model import EvoTokenizer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def resolve_ckpt(path: Path) -> Path:
    """A tokenizer directory, or a run directory holding export/tokenizer."""
    for cand in (path, path / "export" / "tokenizer"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise FileNotFoundError(f"--ckpt {path}: no tokenizer (config.json + model.safetensors) there or in "
                            "export/tokenizer; pass a stage-1 export or run directory")


def read_image(path: Path, resolution: int) -> torch.Tensor:
    """An image file center-cropped to ``resolution`` (ADM crop): uint8 (R, R, 3). Raises on unreadable files."""
    return to_uint8(center_crop(decode_image(Path(path).read_bytes()), resolution))


def reconstruct_files(model: EvoTokenizer, items: list[tuple[Path, Path]], out: Path, depth: int,
                      batch: int = 16) -> dict:
    """Encode and decode (first ``depth`` stages) each ``(image file, output path relative to out)`` and write
    the reconstructions as PNG; returns the summary (mean and per-image PSNR / SSIM, skipped files with their
    reason) that is also written to ``out/metrics.json``."""
    res = model.cfg.encoder.image_size
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for i in range(0, len(items), batch):
        images, names = [], []
        for src, rel in items[i : i + batch]:
            try:
                images.append(read_image(src, res))
                names.append(rel)
            except Exception as e:  # unreadable image: reported, never silent
                skipped.append({"image": str(src), "reason": f"{type(e).__name__}: {e}"})
        if not images:
            continue
        x = normalize(torch.stack(images).to(model.quantizer.codebook.device))  # (B, 3, R, R) in [-1, 1]
        with torch.no_grad():
            rec = model.decode_pixels(model.encode(x), depth).clamp(-1, 1)
        a, b = (x + 1) / 2, (rec + 1) / 2
        for rel, img, pv, sv, sl in zip(names, rec, psnr(b, a), ssim(b, a), ssim_llamagen(b, a)):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            to_pil(img).save(out / rel)
            rows.append({"image": str(rel), "psnr": float(pv), "ssim": float(sv), "ssim_llamagen": float(sl)})
    n = max(len(rows), 1)
    summary = {"images": len(rows), "depth": depth, "psnr": sum(r["psnr"] for r in rows) / n,
               "ssim": sum(r["ssim"] for r in rows) / n, "ssim_llamagen": sum(r["ssim_llamagen"] for r in rows) / n,
               "skipped": skipped, "per_image": rows}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, type=Path)
    ap.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--depth", type=int, default=0, help="quantiser depth to decode from (default: L_pix)")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        model = EvoTokenizer.from_pretrained(resolve_ckpt(args.ckpt), with_teacher=False).eval()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    q = model.cfg.quantizer
    depth = args.depth or q.depth_pix
    if not 1 <= depth <= q.depth_sem:
        print(f"error: --depth {depth} outside 1..{q.depth_sem}", file=sys.stderr)
        return 2
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        print(f"error: --images {args.images}: no jpg/png/webp files", file=sys.stderr)
        return 2
    summary = reconstruct_files(model, [(p, p.relative_to(args.images).with_suffix(".png")) for p in files], args.out,
                                depth, args.batch)
    rows, skipped = summary["per_image"], summary["skipped"]
    print(f"{len(rows)} images at depth {depth}: PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f} "
          f"(LlamaGen convention {summary['ssim_llamagen']:.4f}); skipped {len(skipped)}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
