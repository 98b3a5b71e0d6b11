"""Image transforms without torchvision: ADM-style center / random crop, flip, [-1, 1] tensors.

The crops follow guided-diffusion's ``center_crop_arr`` / ``random_crop_arr`` (also used by LlamaGen
and EvoTok): halve with a BOX filter while the short side is >= 2x the target, then resize with
BICUBIC so the short side matches, then crop. Randomness comes from a numpy Generator passed by the
caller (the loader seeds it from the sample's position, so a resumed run reproduces every crop).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from data.config import ImageConfig


def _shrink_then_resize(img: Image.Image, short_side: int) -> Image.Image:
    while min(img.size) >= 2 * short_side:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = short_side / min(img.size)
    size = tuple(round(x * scale) for x in img.size)
    return img if size == img.size else img.resize(size, resample=Image.BICUBIC)


def center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` and take the central square."""
    img = _shrink_then_resize(img, resolution)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def random_crop(
    img: Image.Image, resolution: int, rng: np.random.Generator, min_crop_frac: float = 0.8, max_crop_frac: float = 1.0
) -> Image.Image:
    """ADM random crop: short side resized to U[res/max_frac, res/min_frac], then a random square."""
    lo, hi = math.ceil(resolution / max_crop_frac), math.ceil(resolution / min_crop_frac)
    img = _shrink_then_resize(img, int(rng.integers(lo, hi + 1)))
    w, h = img.size
    left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    return img.crop((left, top, left + resolution, top + resolution))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    arr = np.array(img.convert("RGB") if img.mode != "RGB" else img)  # (H, W, 3) uint8, writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> RGB PIL image (clamped, rounded)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


class ImageTransform:
    """``ImageConfig`` -> callable(PIL image, rng) -> tensor (3, res, res) in [-1, 1]."""

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        c = self.cfg
        if c.crop == "random":
            img = random_crop(img, c.resolution, rng, c.min_crop_frac)
        elif img.size != (c.resolution, c.resolution):
            img = center_crop(img, c.resolution)
        if c.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img)
