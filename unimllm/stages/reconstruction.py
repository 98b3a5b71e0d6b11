"""The one reconstruction path: images through a tokenizer and back, as the uint8 pixels a user would save.

- :func:`reconstruct`: uint8 images -> codes and uint8 reconstructions decoded from the first ``depth`` stages.
- :func:`evaluate_reconstruction`: its metrics over a folder or shard set (:mod:`eval.recon`), on any number of
  ranks; the command is ``launch/evaluate.py --suite recon`` (:mod:`unimllm.stages.evaluation`).
- :func:`reconstruct_files`: reconstructions of image files written as PNG with per-image PSNR / SSIM; the
  command is ``unimllm reconstruct`` (:mod:`unimllm.stages.cli`).

Every metric compares uint8 originals with uint8 reconstructions (what a saved PNG holds), as the reference
evaluation does.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from data.schema import decode_image
from data.transforms import center_crop, normalize, to_uint8
from eval.inception import load_fid_inception
from eval.metrics import psnr, ssim, ssim_llamagen
from eval.recon import ReconStats, folder_batches, save_comparison, shard_batches
from tokenizer.model import EvoTokenizer
from unimllm.files import atomic_write_json
from unimllm.logging import progress_bar


@torch.no_grad()
def reconstruct(tokenizer: EvoTokenizer, images: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, R, R, 3) -> (codes (B, h, w, L_sem), reconstructions uint8 (B, 3, R, R)) decoded from the
    first ``depth`` quantiser stages, clamped and rounded; on the tokenizer's device."""
    device = next(tokenizer.parameters()).device
    x = normalize(images.to(device))  # (B, 3, R, R) in [-1, 1]
    codes = tokenizer.encode(x)  # (B, h, w, L_sem)
    rec = tokenizer.decode_pixels(codes, depth).float()  # (B, 3, R, R)
    return codes, ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def read_image(path: Path, resolution: int) -> torch.Tensor:
    """An image file center-cropped to ``resolution`` (ADM crop): uint8 (R, R, 3). Raises on unreadable files."""
    return to_uint8(center_crop(decode_image(Path(path).read_bytes()), resolution))


def check_depth(tokenizer: EvoTokenizer, depth: int | None) -> int:
    """``depth`` (default L_pix) if within 1..L_sem, else ValueError naming ``depth``."""
    q = tokenizer.cfg.quantizer
    depth = q.depth_pix if not depth else depth
    if not 1 <= depth <= q.depth_sem:
        raise ValueError(f"depth {depth} outside 1..{q.depth_sem} (L_sem of this tokenizer)")
    return depth


def reconstruct_files(tokenizer: EvoTokenizer, items: list[tuple[Path, Path]], out: Path, depth: int,
                      batch: int = 16) -> dict:
    """Reconstruct each ``(image file, output path relative to out)`` from the first ``depth`` stages and write
    it as PNG; returns the summary (mean and per-image PSNR / SSIM of uint8 original vs PNG, skipped files with
    their reason) that is also written to ``out/metrics.json``."""
    from PIL import Image

    res = tokenizer.cfg.encoder.image_size
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
        real = torch.stack(images)  # (B, R, R, 3) uint8
        _, fake = reconstruct(tokenizer, real, depth)  # (B, 3, R, R) uint8
        a, b = real.movedim(-1, -3).float() / 255, fake.cpu().float() / 255  # (B, 3, R, R) in [0, 1]
        for rel, img, pv, sv, sl in zip(names, fake.cpu(), psnr(b, a), ssim(b, a), ssim_llamagen(b, a)):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.movedim(0, -1).numpy()).save(out / rel)
            rows.append({"image": str(rel), "psnr": float(pv), "ssim": float(sv), "ssim_llamagen": float(sl)})
    n = max(len(rows), 1)
    summary = {"images": len(rows), "depth": depth, "psnr": sum(r["psnr"] for r in rows) / n,
               "ssim": sum(r["ssim"] for r in rows) / n, "ssim_llamagen": sum(r["ssim_llamagen"] for r in rows) / n,
               "skipped": skipped, "per_image": rows}
    atomic_write_json(out / "metrics.json", summary)
    return summary


@torch.no_grad()
def accumulate_reconstruction(tokenizer: EvoTokenizer, source: str | Path, *, depth: int | None = None,
                              resolution: int | None = None, batch_size: int = 16,
                              inception_weights: str | Path | None = None, feature: nn.Module | None = None,
                              lpips: nn.Module | None = None, max_images: int | None = None, rank: int = 0,
                              world_size: int = 1, keep_examples: int = 0) -> ReconStats:
    """This rank's sums over its share of ``source`` (no reduction); see :func:`evaluate_reconstruction`."""
    q = tokenizer.cfg.quantizer
    depth = check_depth(tokenizer, depth)
    res = tokenizer.cfg.encoder.image_size
    if resolution is not None and resolution != res:
        raise ValueError(f"resolution {resolution} != the tokenizer's image size {res}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if inception_weights is not None and feature is not None:
        raise ValueError("give inception_weights or feature, not both")
    if inception_weights is not None:
        feature = load_fid_inception(inception_weights, "inception_weights")
    device = next(tokenizer.parameters()).device
    stats = ReconStats(q.codebook_size, q.depth_sem, feature=feature,
                       lpips=lpips.to(device) if lpips is not None else None, device=device, probe_size=res)
    stats.depth = depth
    src = Path(source)
    skipped: Counter = Counter()
    if src.is_dir():
        batches = folder_batches(src, res, batch_size, rank, world_size, max_images, skipped)
    elif ".tar" in str(source):
        batches = shard_batches(str(source), res, batch_size, rank, world_size, max_images, skipped)
    else:
        raise FileNotFoundError(f"source {source}: neither a folder nor a .tar shard pattern")
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        for images in progress_bar(batches, desc="reconstruct", unit="batch", main=rank == 0):
            codes, fake = reconstruct(tokenizer, images, depth)
            real = images.to(device).movedim(-1, -3)  # (B, 3, R, R) uint8
            stats.update(real, fake, codes)
            n_kept = 0 if stats.examples is None else len(stats.examples[0])
            if n_kept < keep_examples:
                new = (real[: keep_examples - n_kept].cpu(), fake[: keep_examples - n_kept].cpu())
                stats.examples = new if stats.examples is None else tuple(
                    torch.cat([o, t]) for o, t in zip(stats.examples, new))
    finally:
        tokenizer.train(was_training)
    stats.sums["skipped"] += sum(skipped.values())
    return stats


def evaluate_reconstruction(tokenizer: EvoTokenizer, source: str | Path, *, depth: int | None = None,
                            resolution: int | None = None, batch_size: int = 16,
                            inception_weights: str | Path | None = None, feature: nn.Module | None = None,
                            lpips: nn.Module | None = None, max_images: int | None = None, rank: int = 0,
                            world_size: int = 1, grid_path: str | Path | None = None,
                            grid_images: int = 8) -> dict[str, float]:
    """Reconstruction metrics of ``tokenizer`` over a folder or shard pattern, decoded from ``depth`` stages.

    Returns ``{n_images, depth, skipped, psnr, ssim, ssim_llamagen, [lpips], [rfid], usage_d{i},
    perplexity_d{i}}`` over the whole set (all ranks). rFID needs ``inception_weights`` (a local FID
    Inception file; missing -> ConfigError naming ``inception_weights``) or ``feature`` (any module mapping
    images (B, 3, H, W) float in [0, 1] to (B, d)); with neither it is left out. ``world_size > 1`` needs an
    initialised process group of that size; every rank must call (collective) and gets the same result.
    ``grid_path``: rank 0 writes its first ``grid_images`` originals (top) over their reconstructions.
    """
    if world_size > 1 and not (dist.is_initialized() and dist.get_world_size() == world_size):
        raise ValueError(f"world_size {world_size} needs an initialised process group of that size "
                         "(use accumulate_reconstruction + ReconStats.merge to combine shares by hand)")
    stats = accumulate_reconstruction(tokenizer, source, depth=depth, resolution=resolution,
                                      batch_size=batch_size, inception_weights=inception_weights, feature=feature,
                                      lpips=lpips, max_images=max_images, rank=rank, world_size=world_size,
                                      keep_examples=grid_images if grid_path and rank == 0 else 0)
    if world_size > 1:
        stats.all_reduce()
    if not int(stats.sums["n"]):
        raise ValueError(f"source {source}: no image could be evaluated ({int(stats.sums['skipped'])} skipped)")
    if grid_path and stats.examples is not None:
        save_comparison(*stats.examples, grid_path)
    return stats.compute()
