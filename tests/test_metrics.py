"""Reconstruction metrics match scikit-image (the reference the EvoTok/LlamaGen evaluation uses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.metrics import psnr, ssim, ssim_llamagen

skm = pytest.importorskip("skimage.metrics")


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    a = rng.random((3, 3, 40, 48))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    return torch.from_numpy(a).float(), torch.from_numpy(b).float()


def _hwc(t: torch.Tensor, i: int) -> np.ndarray:
    return t[i].permute(1, 2, 0).double().numpy()


def test_psnr_matches_skimage(pair):
    a, b = pair
    ours = psnr(a, b)
    ref = [skm.peak_signal_noise_ratio(_hwc(a, i), _hwc(b, i), data_range=1.0) for i in range(3)]
    assert np.allclose(ours.numpy(), ref, atol=1e-4)
    assert torch.isinf(psnr(a, a)).all()


def test_ssim_standard_matches_skimage(pair):
    a, b = pair
    ours = ssim(a, b)
    ref = [skm.structural_similarity(_hwc(a, i), _hwc(b, i), channel_axis=-1, data_range=1.0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
           for i in range(3)]
    assert np.allclose(ours.numpy(), ref, atol=1e-5)


def test_ssim_llamagen_convention_matches_its_skimage_call(pair):
    a, b = pair
    ours = ssim_llamagen(a, b)
    ref = [skm.structural_similarity(_hwc(a, i), _hwc(b, i), channel_axis=-1, data_range=2.0) for i in range(3)]
    assert np.allclose(ours.numpy(), ref, atol=1e-5)
    assert (ours > ssim(a, b)).all()  # the convention inflates SSIM
