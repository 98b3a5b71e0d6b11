"""Reconstruction evaluation of an EvoTok tokenizer: rFID, PSNR, SSIM (two conventions), LPIPS, code usage.

    python -m eval.recon --ckpt runs/stage1/tiny/export/tokenizer --source DIR_OR_SHARDS \
        --inception_weights pt_inception-2015-12-05-6726825d.pth [--depth 4] [--out DIR]
    torchrun --nproc_per_node 8 -m eval.recon ...   # each rank evaluates its share; statistics are summed

Protocol (EvoTok's ``reconstruction_rq_ddp.py``, after LlamaGen's ``reconstruction_vq_ddp.py``):

- ADM center crop to the tokenizer's resolution (``data.transforms.center_crop`` is guided-diffusion's
  ``center_crop_arr``: BOX halving while the short side >= 2x, BICUBIC resize, central square);
- encode, decode from the first ``depth`` stages (default L_pix), clamp and round to uint8 (the reference
  scores saved PNGs), so every metric compares uint8 originals with uint8 reconstructions;
- rFID: torchmetrics ``FrechetInceptionDistance`` between the originals' and the reconstructions' features,
  from the FID Inception-v3 (``eval.inception``: pytorch-fid's graph, weights and preprocessing) or any
  feature module;
- PSNR (dB, capped at 100 per image as in stage-1 validation) and SSIM per image on [0, 1], averaged over
  images: ``ssim`` is standard SSIM, ``ssim_llamagen`` the LlamaGen/TokenFlow/EvoTok convention
  (``data_range=2.0`` on [0, 1] images, inflated; see ``eval.metrics``); LPIPS (VGG) when a module is given;
- per stage i = 1..L_sem of the encoded codes (whatever ``depth`` is decoded): ``usage_d{i}``, the fraction
  of the K codes used at least once over the whole set, and ``perplexity_d{i}`` = exp(entropy of the code
  frequencies), in [1, K].

Sources: a folder (images searched recursively, sorted; rank r takes files[r::world]) or WebDataset shards
(``data.loader.eval_loader``: rank r takes its contiguous share). ``max_images`` keeps the first N images of
the whole set (sorted files / shard order) on any number of ranks. Unreadable images are skipped and counted.
Folder images are fully decoded; shards go through the loader's decoder, which decodes a JPEG whose short side
is >= 2x the resolution at a reduced DCT scale before the crop (slightly different pixels from a full decode +
BOX halving; ImageNet val at 256 px, short sides mostly < 512, is barely affected).
Every statistic is a sum (FID feature sums, outer-product sums and counts; metric sums; code counts) reduced
over ranks with one in-place all_reduce per tensor, so the result equals one process's up to summation order.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from data.schema import decode_image
from data.transforms import center_crop, normalize, to_uint8
from eval.inception import load_fid_inception
from eval.metrics import psnr, ssim, ssim_llamagen
from tokenizer.lpips import LPIPS
from tokenizer.model import EvoTokenizer
from tokenizer.reconstruct import IMAGE_SUFFIXES, resolve_ckpt
from unimllm.config import ConfigError

log = logging.getLogger(__name__)
PSNR_CAP = 100.0


class _Float64Features(nn.Module):
    """Wraps a feature network for torchmetrics: float images in [0, 1] -> (B, d) float64, with ``num_features``
    set (from the module's attribute, else one probe forward), so FID is computed and returned in float64."""

    def __init__(self, net: nn.Module, probe_size: int):
        super().__init__()
        self.net = net
        n = getattr(net, "num_features", None)
        if n is None:
            with torch.no_grad():
                p = next(net.parameters(), torch.empty(0))
                n = net(torch.rand(1, 3, probe_size, probe_size, device=p.device, dtype=p.dtype)).shape[-1]
        self.num_features = int(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(x.shape[0], -1).double()  # (B, d)


class ReconStats:
    """Sums over images for every metric; :meth:`merge` / :meth:`all_reduce` add other ranks' sums in place.

    Args:
        codebook_size, depth_sem: K and L_sem of the tokenizer (code-usage counts are (L_sem, K)).
        feature: FID feature network (images (B, 3, H, W) float in [0, 1] -> (B, d)); None skips rFID.
        lpips: an ``LPIPS`` module (or None); probe_size: image side for probing a feature net without
            ``num_features``.
    """

    def __init__(self, codebook_size: int, depth_sem: int, *, feature: nn.Module | None = None,
                 lpips: LPIPS | None = None, device: torch.device | str = "cpu", probe_size: int = 299):
        self.device, self.lpips, self.depth = torch.device(device), lpips, 0
        self.fid: FrechetInceptionDistance | None = None
        if feature is not None:
            feature = feature.to(self.device).eval()
            self.fid = FrechetInceptionDistance(feature=_Float64Features(feature, probe_size), normalize=True,
                                                sync_on_compute=False, compute_with_cache=False).to(self.device)
            self.fid.orig_dtype = torch.float64  # set by update(); a rank without images must compute too
        names = ["n", "psnr", "ssim", "ssim_llamagen", "skipped"] + (["lpips"] if lpips is not None else [])
        self.sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in names}
        self.sums["codes"] = torch.zeros(depth_sem, codebook_size, dtype=torch.int64, device=self.device)
        self.examples: tuple[torch.Tensor, torch.Tensor] | None = None  # first (originals, recons) kept

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every accumulated tensor (the metric sums and torchmetrics' FID states), by name; live references."""
        out = dict(self.sums)
        if self.fid is not None:
            out.update({f"fid.{k}": v for k, v in self.fid.metric_state.items()})
        return out

    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor, codes: torch.Tensor) -> None:
        """real, fake uint8 (B, 3, H, W); codes (B, h, w, L_sem) of the originals."""
        s = self.sums
        a, b = real.float() / 255, fake.float() / 255  # (B, 3, H, W) in [0, 1]
        s["n"] += a.shape[0]
        s["psnr"] += psnr(b, a).clamp(max=PSNR_CAP).double().sum()
        s["ssim"] += ssim(b, a).double().sum()
        s["ssim_llamagen"] += ssim_llamagen(b, a).double().sum()
        if self.lpips is not None:
            s["lpips"] += self.lpips(a * 2 - 1, b * 2 - 1).double().sum()
        if self.fid is not None:
            self.fid.update(a, real=True)
            self.fid.update(b, real=False)
        L, K = s["codes"].shape
        flat = codes.reshape(-1, L) + torch.arange(L, device=codes.device) * K  # (N, L): stage i -> [iK, iK+K)
        s["codes"] += torch.bincount(flat.flatten(), minlength=L * K).view(L, K).to(s["codes"].device)

    def merge(self, other: dict[str, torch.Tensor]) -> None:
        """Add another rank's :meth:`tensors` (same tokenizer, same metric set) into this one."""
        own = self.tensors()
        if set(own) != set(other):
            raise ValueError(f"ReconStats.merge: statistics differ: {sorted(set(own) ^ set(other))}")
        for k, t in own.items():
            t.add_(other[k].to(t.device, t.dtype))

    def all_reduce(self) -> None:
        """Sum every statistic over the process group in place (collective: every rank calls it)."""
        for _, t in sorted(self.tensors().items()):
            dist.all_reduce(t)

    def compute(self) -> dict[str, float]:
        """Means over images, rFID (NaN with fewer than 2 images), per-stage code usage and perplexity."""
        s = self.sums
        n = float(s["n"])
        out: dict[str, float] = {"n_images": int(n), "depth": self.depth, "skipped": int(s["skipped"])}
        for k in ("psnr", "ssim", "ssim_llamagen", "lpips"):
            if k in s:
                out[k] = float(s[k]) / n if n else math.nan
        if self.fid is not None:
            out["rfid"] = float(self.fid.compute()) if n >= 2 else math.nan
        counts = s["codes"].double()  # (L_sem, K)
        p = counts / counts.sum(1, keepdim=True).clamp(min=1)  # (L_sem, K) code frequencies
        usage = (counts > 0).double().mean(1)  # (L_sem,)
        ppl = torch.exp(-torch.special.xlogy(p, p).sum(1))  # (L_sem,)
        for i in range(counts.shape[0]):
            out[f"usage_d{i + 1}"], out[f"perplexity_d{i + 1}"] = float(usage[i]), float(ppl[i])
        return out


def _folder_batches(root: Path, resolution: int, batch_size: int, rank: int, world: int, max_images: int | None,
                    skipped: Counter) -> Iterator[torch.Tensor]:
    """uint8 (B, R, R, 3) ADM-cropped batches of this rank's files; unreadable files counted in ``skipped``."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"source {root}: no {'/'.join(sorted(IMAGE_SUFFIXES))} files")
    mine = files[:max_images][rank::world]
    for i in range(0, len(mine), batch_size):
        batch = []
        for p in mine[i : i + batch_size]:
            try:
                batch.append(load_image(p, resolution))
            except Exception as e:  # counted, never silent
                skipped["bad_image"] += 1
                log.warning("eval.recon: skipped %s (%s: %s)", p, type(e).__name__, e)
        if batch:
            yield torch.stack(batch)


def _shard_batches(spec: str, resolution: int, batch_size: int, rank: int, world: int, max_images: int | None,
                   skipped: Counter) -> Iterator[torch.Tensor]:
    """uint8 (B, R, R, 3) batches of this rank's contiguous share of the shards (in shard order)."""
    from data.loader import eval_loader

    loader = eval_loader(spec, batch_size, resolution, rank=rank, world_size=world)
    lo, hi = loader.shardset.worker_range(rank, world)  # this rank's positions in the whole set
    keep = hi - lo if max_images is None else max(0, min(max_images, hi) - lo)
    for batch in loader if keep > 0 else ():
        images = batch["image"][:keep]
        keep -= len(images)
        yield images
        if keep <= 0:
            break
    skipped.update(loader.skipped)
    if rank == 0:
        skipped.update(loader.shardset.index_errors)  # the same on every rank: count once


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """One image file -> ADM center crop as uint8 (R, R, 3) (full decode, no JPEG draft scaling)."""
    return to_uint8(center_crop(decode_image(Path(path).read_bytes()), resolution))


@torch.no_grad()
def accumulate_reconstruction(tokenizer: EvoTokenizer, source: str | Path, *, depth: int | None = None,
                              resolution: int | None = None, batch_size: int = 16,
                              inception_weights: str | Path | None = None, feature: nn.Module | None = None,
                              lpips: LPIPS | None = None, max_images: int | None = None, rank: int = 0,
                              world_size: int = 1, keep_examples: int = 0) -> ReconStats:
    """This rank's sums over its share of ``source`` (no reduction); see :func:`evaluate_reconstruction`."""
    q = tokenizer.cfg.quantizer
    depth = q.depth_pix if depth is None else depth
    if not 1 <= depth <= q.depth_sem:
        raise ValueError(f"depth {depth} outside 1..{q.depth_sem} (L_sem of this tokenizer)")
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
        batches = _folder_batches(src, res, batch_size, rank, world_size, max_images, skipped)
    elif ".tar" in str(source):
        batches = _shard_batches(str(source), res, batch_size, rank, world_size, max_images, skipped)
    else:
        raise FileNotFoundError(f"source {source}: neither a folder nor a .tar shard pattern")
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        for images in batches:
            x = normalize(images.to(device))  # (B, 3, R, R) in [-1, 1]
            codes = tokenizer.encode(x)  # (B, h, w, L_sem)
            rec = tokenizer.decode_pixels(codes, depth).float()  # (B, 3, R, R)
            fake = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, R, R)
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
                            lpips: LPIPS | None = None, max_images: int | None = None, rank: int = 0,
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


def save_comparison(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> Path:
    """uint8 (N, 3, H, W) originals and reconstructions -> one PNG: originals on top, reconstructions below."""
    top = np.concatenate(list(originals.movedim(1, -1).cpu().numpy()), 1)  # (H, N*W, 3)
    bottom = np.concatenate(list(reconstructions.movedim(1, -1).cpu().numpy()), 1)  # (H, N*W, 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([top, bottom], 0)).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, type=Path, help="tokenizer directory or stage-1 run directory")
    ap.add_argument("--source", required=True, help="image folder or .tar shard pattern")
    ap.add_argument("--depth", type=int, default=0, help="quantiser depth to decode from (default: L_pix)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max_images", type=int, default=0, help="first N images only (0: all)")
    ap.add_argument("--inception_weights", default="", help="local FID Inception weights; empty: no rFID")
    ap.add_argument("--lpips_vgg", default="", help="LPIPS VGG16 weights; empty: no LPIPS")
    ap.add_argument("--lpips_heads", default="", help="LPIPS linear heads (default: the --lpips_vgg file)")
    ap.add_argument("--out", type=Path, default=None, help="write metrics.json and grid.png here (rank 0)")
    args = ap.parse_args(argv)
    rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from unimllm.distributed import init_distributed

        info = init_distributed()
        rank, world, device = info.rank, info.world_size, info.device
    try:
        tok = EvoTokenizer.from_pretrained(resolve_ckpt(args.ckpt), with_teacher=False, device=device)
        lp = None
        if args.lpips_vgg:
            lp = LPIPS(args.lpips_vgg, args.lpips_heads or args.lpips_vgg, vgg_field="--lpips_vgg",
                       heads_field="--lpips_heads")
        metrics = evaluate_reconstruction(
            tok, args.source, depth=args.depth or None, batch_size=args.batch, max_images=args.max_images or None,
            inception_weights=args.inception_weights or None, lpips=lp, rank=rank, world_size=world,
            grid_path=args.out / "grid.png" if args.out else None)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        if not args.inception_weights:
            print("note: rFID skipped (no --inception_weights)", file=sys.stderr)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
