"""Image transforms without torchvision: ADM-style center / random crop, flip, [-1, 1] normalisation.

The crops follow guided-diffusion's ``center_crop_arr`` / ``random_crop_arr`` (also used by LlamaGen
and EvoTok): halve with a BOX filter while the short side is >= 2x the target, then resize with
BICUBIC so the short side matches, then crop. Randomness comes from a numpy Generator passed by the
caller (the loader seeds it from the sample's position, so a resumed run reproduces every crop).

The loader ships images as uint8 ``(H, W, 3)`` tensors (4x less memory and inter-process traffic than
float); :func:`normalize` turns a batch into model input ``(B, 3, H, W)`` in [-1, 1] on the device.
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


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 array (H, W, 3), read-only view of one copy of the pixels."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(h, w, 3)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (H, W, 3)."""
    return torch.from_numpy(np.array(to_array(img)))  # writable copy


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]; run it on the training device."""
    return images.movedim(-1, -3).float().div_(127.5).sub_(1.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    return normalize(to_uint8(img))


def denormalize(x: torch.Tensor) -> np.ndarray:
    """The inverse of :func:`normalize`: float (..., 3, H, W) in [-1, 1] -> uint8 array (..., H, W, 3)
    (clamped, rounded), e.g. for saving or scoring model outputs."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (..., 3, H, W)
    return arr.movedim(-3, -1).cpu().numpy()


def to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> RGB PIL image (clamped, rounded)."""
    return Image.fromarray(denormalize(x))


class ImageTransform:
    """``ImageConfig`` -> callable(PIL image, rng) -> uint8 array (res, res, 3).

    Arrays (not tensors) so the collate function copies pixels once, into the stacked batch.

    ``needs_rng`` is False for deterministic (eval) settings, so callers may pass ``rng=None``.
    ``decode_min_side`` is the smallest short side the crop needs: decoders may downscale on load
    (JPEG draft mode) to that size.
    """

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg
        self.needs_rng = cfg.crop == "random" or cfg.flip
        self.decode_min_side = (
            math.ceil(cfg.resolution / cfg.min_crop_frac) if cfg.crop == "random" else cfg.resolution
        )

    def __call__(self, img: Image.Image | np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        c = self.cfg
        if isinstance(img, np.ndarray):
            if c.crop == "center" and img.shape[:2] == (c.resolution, c.resolution):
                arr = img  # already the right size: no PIL round trip
            else:
                return self(Image.fromarray(img), rng)
        elif c.crop == "random":
            assert rng is not None
            arr = to_array(random_crop(img, c.resolution, rng, c.min_crop_frac))
        else:
            arr = to_array(img if img.size == (c.resolution, c.resolution) else center_crop(img, c.resolution))
        if c.flip and rng is not None and rng.random() < 0.5:
            arr = arr[:, ::-1]  # (H, W, 3) view; the collate copy makes it contiguous
        return arr
