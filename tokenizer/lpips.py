"""LPIPS (VGG16) perceptual distance in plain torch (no torchvision).

``VGG16Features.features`` has the same module indices as torchvision's ``vgg16().features`` (convs at 0, 2,
5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), so a torchvision state dict (``features.0.weight`` ...) loads as is;
the LPIPS model's own naming (``net.slice1.0.weight`` ... ``net.slice5.28.bias``) is accepted too. The five
linear heads keep the LPIPS / taming ``vgg.pth`` keys (``lin0.model.1.weight`` ... ``lin4.model.1.weight``;
index 1 because the reference puts a Dropout at index 0); heads saved without the dropout
(``lin0.model.0.weight``) load as well. Dropout is not applied: the metric is deterministic and always in
eval mode.

Weights come from local files only (safetensors, or ``torch.load(weights_only=True)``). Missing files raise a
ConfigError naming the config field, unless ``random_weights=True`` is requested explicitly (smoke runs): the
VGG is then randomly initialised and the heads set to 1/C, which keeps the distance >= 0, exactly 0 for
identical inputs and > 0 for (in practice all) different ones.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from unimllm.config import ConfigError
from unimllm.files import load_state_file

# torchvision vgg16 "features" up to relu5_3: channel widths per conv, "M" = 2x2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices (into ``features``) of the ReLUs whose outputs LPIPS compares: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (3, 8, 15, 22, 29)
_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """torchvision's VGG16 ``features[:30]`` (through relu5_3), returning the five LPIPS taps."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers)  # 30 modules, indices as torchvision

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                taps.append(x)  # (B, C_k, H_k, W_k)
        return taps


class _Head(nn.Module):
    """LPIPS linear head: a 1x1 conv C -> 1 without bias, at ``model.1`` as in the reference weights."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _vgg_key(key: str) -> str | None:
    """Map a VGG key in torchvision (``features.N.*``) or LPIPS (``net.sliceK.N.*``) naming to ours."""
    if key.startswith("features."):
        return key
    m = re.fullmatch(r"(?:.*\.)?net\.slice\d\.(\d+)\.(weight|bias)", key)
    return f"features.{m.group(1)}.{m.group(2)}" if m else None


def _head_key(key: str) -> str | None:
    m = re.fullmatch(r"(?:.*\.)?lin(\d)\.model\.[01]\.weight", key)
    return f"lin{m.group(1)}.model.1.weight" if m else None


class LPIPS(nn.Module):
    """Learned perceptual distance between images in [-1, 1]; returns one value per sample, (B,).

    Args:
        vgg_path: torchvision VGG16 weights (``features.*``) or an LPIPS state dict (``net.slice*``).
        heads_path: LPIPS linear heads (``lin0.model.1.weight`` ..., e.g. taming's / LPIPS's ``vgg.pth``); may be
            the same file as ``vgg_path`` when it holds a full LPIPS state dict.
        random_weights: skip loading (smoke runs only).
        vgg_field, heads_field: config field names used in error messages.
    """

    def __init__(self, vgg_path: str = "", heads_path: str = "", *, random_weights: bool = False,
                 vgg_field: str = "lpips_vgg_path", heads_field: str = "lpips_heads_path"):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        for i, c in enumerate(_CHANNELS):
            self.add_module(f"lin{i}", _Head(c))
        if random_weights:
            for i, c in enumerate(_CHANNELS):
                nn.init.constant_(self.heads[i].model[1].weight, 1.0 / c)
        else:
            self.load_vgg(load_state_file(vgg_path, vgg_field), vgg_field)
            self.load_heads(load_state_file(heads_path, heads_field), heads_field)
        self.requires_grad_(False)
        self.eval()

    @property
    def heads(self) -> list[_Head]:
        return [getattr(self, f"lin{i}") for i in range(len(_CHANNELS))]

    @staticmethod
    def _copy_into(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], field: str) -> None:
        missing = sorted(set(own) - set(sd))
        bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
        if missing or bad:
            more = "..." if len(missing) > 6 else ""
            raise ConfigError(field, f"weights do not fit LPIPS: missing {missing[:6]}{more}"
                                     f"{'; shape mismatch ' + ', '.join(bad) if bad else ''}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(sd[k])

    def load_vgg(self, sd: dict[str, torch.Tensor], field: str = "lpips_vgg_path") -> None:
        """Load VGG16 conv weights from a torchvision- or LPIPS-format state dict (other keys ignored)."""
        mapped = {k2: v for k, v in sd.items() if (k2 := _vgg_key(k)) is not None}
        self._copy_into(dict(self.net.named_parameters()), mapped, field)

    def load_heads(self, sd: dict[str, torch.Tensor], field: str = "lpips_heads_path") -> None:
        """Load the five linear heads (``linK.model.1.weight`` or ``linK.model.0.weight``; other keys ignored)."""
        mapped = {k2: v for k, v in sd.items() if (k2 := _head_key(k)) is not None}
        own = {f"lin{i}.model.1.weight": h.model[1].weight for i, h in enumerate(self.heads)}
        self._copy_into(own, mapped, field)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a fixed metric: always eval

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] -> distance (B,)."""
        n = x.shape[0]
        feats = self.net((torch.cat([x, y]) - self.shift) / self.scale)  # 5 x (2B, C_k, H_k, W_k)
        total = x.new_zeros(n)
        for f, head in zip(feats, self.heads):
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit norm over channels
            d = (f[:n] - f[n:]).pow(2)  # (B, C_k, H_k, W_k)
            total = total + head(d).mean(dim=(1, 2, 3))  # (B,)
        return total
