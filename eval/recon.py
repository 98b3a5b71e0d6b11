"""Reconstruction metrics: rFID, PSNR, SSIM (two conventions), LPIPS, code usage, summed over images and ranks.

The tokenizer is run by :func:`unimllm.stages.reconstruction.evaluate_reconstruction` (the command is
``launch/evaluate.py --suite recon``); this module holds what it measures with, and reads images from:

    torchrun --nproc_per_node 8 launch/evaluate.py --suite recon --ckpt runs/stage1/tiny \
        --recon.source DIR_OR_SHARDS --recon.inception_weights pt_inception-2015-12-05-6726825d.pth

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

import logging
import math
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
from data.transforms import center_crop, to_uint8
from eval.metrics import psnr, ssim, ssim_llamagen

log = logging.getLogger(__name__)
PSNR_CAP = 100.0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}  # what a folder of images is searched for


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
                 lpips: nn.Module | None = None, device: torch.device | str = "cpu", probe_size: int = 299):
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


def folder_batches(root: Path, resolution: int, batch_size: int, rank: int, world: int, max_images: int | None,
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


def shard_batches(spec: str, resolution: int, batch_size: int, rank: int, world: int, max_images: int | None,
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


def save_comparison(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> Path:
    """uint8 (N, 3, H, W) originals and reconstructions -> one PNG: originals on top, reconstructions below."""
    top = np.concatenate(list(originals.movedim(1, -1).cpu().numpy()), 1)  # (H, N*W, 3)
    bottom = np.concatenate(list(reconstructions.movedim(1, -1).cpu().numpy()), 1)  # (H, N*W, 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([top, bottom], 0)).save(path)
    return path
