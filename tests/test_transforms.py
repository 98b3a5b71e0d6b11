"""Image transforms: ADM crops, flip, normalisation range, JPEG draft decoding keeps enough pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import ImageConfig
from data.schema import decode_image, decode_pixels, encode_image
from data.transforms import ImageTransform, center_crop, normalize, random_crop, to_pil, to_tensor


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    x[..., 1] = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    return Image.fromarray(x.astype(np.uint8))


def test_center_crop_is_centered_and_sized():
    img = gradient(300, 200)
    out = center_crop(img, 64)
    assert out.size == (64, 64)
    arr = np.asarray(out).astype(int)
    # horizontally centred: the red gradient at the crop centre is mid-range, vertically the full range
    assert abs(arr[32, 32, 0] - 128) < 12 and arr[0, 32, 1] < 20 and arr[-1, 32, 1] > 235


def test_random_crop_sizes_and_variety():
    img = gradient(320, 240)
    rng = np.random.default_rng(0)
    crops = [np.asarray(random_crop(img, 64, rng, 0.8)) for _ in range(8)]
    assert all(c.shape == (64, 64, 3) for c in crops)
    assert len({c.tobytes() for c in crops}) > 1


def test_transform_outputs_uint8_and_normalize_range():
    t = ImageTransform(ImageConfig(resolution=32, crop="random", flip=True))
    assert t.needs_rng and t.decode_min_side == 40
    x = t(gradient(50, 40), np.random.default_rng(1))
    assert x.dtype == np.uint8 and x.shape == (32, 32, 3)
    y = normalize(torch.from_numpy(np.ascontiguousarray(x))[None])
    assert y.shape == (1, 3, 32, 32) and y.min() >= -1 and y.max() <= 1
    assert not ImageTransform(ImageConfig(resolution=32)).needs_rng


def test_flip_happens_about_half_the_time():
    t = ImageTransform(ImageConfig(resolution=16, flip=True))
    img = gradient(16, 16)
    ref = np.asarray(img)
    flips = sum(not np.array_equal(t(img, np.random.default_rng(i)), ref) for i in range(200))
    assert 70 < flips < 130


def test_to_tensor_to_pil_roundtrip():
    img = gradient(20, 12)
    assert np.array_equal(np.asarray(to_pil(to_tensor(img))), np.asarray(img))


def test_jpeg_draft_decode_never_below_min_side():
    data = encode_image(gradient(640, 480), "jpg")
    full = decode_image(data)
    small = decode_image(data, min_side=100)
    assert full.size == (640, 480) and min(small.size) >= 100 and small.size[0] < 640
    out = ImageTransform(ImageConfig(resolution=100))(small, None)
    ref = ImageTransform(ImageConfig(resolution=100))(full, None)
    assert np.abs(out.astype(float) - ref.astype(float)).mean() < 3  # draft decoding barely changes it


def test_fast_jpeg_decode_matches_pil_and_is_as_strict():
    data = encode_image(gradient(120, 90), "jpg")
    fast = decode_pixels(data)
    assert isinstance(fast, np.ndarray) and np.array_equal(fast, np.asarray(decode_image(data)))
    scaled = decode_pixels(data, min_side=40)
    assert min(scaled.shape[:2]) >= 40 and scaled.shape[1] < 120
    with pytest.raises(OSError, match="truncated"):  # simplejpeg refuses, PIL decides: truncated
        decode_pixels(data[: len(data) // 2])
    arr = ImageTransform(ImageConfig(resolution=90))(fast, None)
    assert arr.shape == (90, 90, 3)
