"""Image reconstruction metrics in plain torch: PSNR and SSIM (two conventions), batched.

Inputs are float tensors (B, C, H, W) in [0, 1]. Two SSIM conventions are reported and labelled:

- ``ssim`` (standard, Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), data_range 1.0,
  population covariance (= skimage ``gaussian_weights=True, use_sample_covariance=False``).
- ``ssim_llamagen``: the LlamaGen / TokenFlow / EvoTok evaluation call, skimage's defaults (7x7 uniform
  window, sample covariance) with ``data_range=2.0`` on [0, 1] images, which inflates SSIM; use it only
  to compare with numbers published that way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,). Identical images give +inf."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(data_range**2 / mse)).float()


def _window(size: int, gaussian: bool, sigma: float, device) -> torch.Tensor:
    """Separable window as (k,) float32 taps summing to 1."""
    if gaussian:
        ax = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
        g = torch.exp(-(ax**2) / (2 * sigma**2))
        return (g / g.sum()).float()
    return torch.full((size,), 1.0 / size, dtype=torch.float32, device=device)


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, win_size: int = 11, gaussian: bool = True,
         sigma: float = 1.5, sample_covariance: bool = False) -> torch.Tensor:
    """Per-image SSIM (B,), mean over channels and the valid (uncropped) window positions (as skimage)."""
    B, C, H, W = x.shape
    if min(H, W) < win_size:
        raise ValueError(f"ssim: images {H}x{W} are smaller than the {win_size}x{win_size} window")
    x, y = x.float(), y.float()
    w = _window(win_size, gaussian, sigma, x.device)
    k = win_size

    def filt(t: torch.Tensor) -> torch.Tensor:
        """Separable 'valid' filtering of (B, C, H, W) -> (B, C, H-k+1, W-k+1), channels as batch."""
        t = t.reshape(B * C, 1, H, W)
        t = F.conv2d(t, w.view(1, 1, k, 1))  # (BC, 1, H-k+1, W)
        t = F.conv2d(t, w.view(1, 1, 1, k))  # (BC, 1, H-k+1, W-k+1)
        return t.view(B, C, H - k + 1, W - k + 1)

    ux, uy = filt(x), filt(y)
    uxx, uyy, uxy = filt(x * x), filt(y * y), filt(x * y)
    n = win_size * win_size
    cov_norm = n / (n - 1) if sample_covariance else 1.0
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()


def ssim_llamagen(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM as LlamaGen/TokenFlow/EvoTok report it: skimage defaults with data_range=2.0 on [0, 1] images."""
    return ssim(x, y, data_range=2.0, win_size=7, gaussian=False, sample_covariance=True)
