"""Stage-1 tokenizer losses: reconstruction, LPIPS, PatchGAN (hinge), commitment, semantic cosine.

EvoTok's generator objective (reference §1.3), every weight a constructor argument of ``TokenizerLoss``::

    L_G = w_rec * MSE(x, x_hat) + w_p * LPIPS(x, x_hat) + w_gan * [step >= disc_start] * (-mean D(x_hat))
        + w_commit * L_commit + w_sem * (L_cos + L_cos_fold4)

and the discriminator's ``w_gan * [step >= disc_start] * hinge(D(x), D(x_hat))``, trained in its own step.
The knobs (weights, ``disc_start``, LPIPS paths) belong to the stage-1 training config; this module only
takes them as arguments. LPIPS lives in ``tokenizer.lpips``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.lpips import LPIPS

# ----------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix ``NLayerDiscriminator``): 4x4 convs, stride 2 for the first ``n_layers``, LeakyReLU 0.2,
    normalisation after every conv but the first and last, N(0, 0.02) init; (B, 3, H, W) -> logits
    (B, 1, h, w). Module indices under ``main`` follow the reference, so its discriminator weights load.

    Args:
        in_channels: image channels.
        ndf: filters of the first conv (doubling per layer, capped at 8 x ndf).
        n_layers: strided conv layers.
        norm: ``batch`` (reference) or ``group`` (GroupNorm, for tiny per-device batches).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
                 norm: Literal["batch", "group"] = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(math.gcd(32, c), c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       norm_layer(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h, w)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean D(x_hat)."""
    return -fake_logits.mean()


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's adaptive weight ||grad nll|| / (||grad g|| + 1e-4) on the decoder's last layer, clamped to
    [0, max_weight] and detached. Off in EvoTok; needs both losses' graphs (uses retain_graph)."""
    g_nll = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


@contextmanager
def _no_param_grads(module: nn.Module):
    """Gradients flow through ``module`` to its input but are not accumulated into its parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


# ----------------------------------------------------------------------------- regression losses


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: Literal["mse", "l1"] = "mse") -> torch.Tensor:
    """Pixel loss, mean over all elements."""
    if kind == "mse":
        return F.mse_loss(recon, target)
    if kind == "l1":
        return F.l1_loss(recon, target)
    raise ValueError(f"reconstruction loss must be 'mse' or 'l1', got {kind!r}")


def semantic_loss(pred: torch.Tensor, target: torch.Tensor, chunks: int = 4) -> torch.Tensor:
    """EvoTok's cosine + fold loss: mean(1 - cos(pred, target)) over tokens, plus the same mean computed on
    ``chunks`` equal slices of the channel dim and averaged (chunks < 2: the first term only).
    pred, target (B, N, C) -> scalar; computed in float32."""
    pred, target = pred.float(), target.float()
    loss = (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
    if chunks >= 2:
        C = pred.shape[-1]
        if C % chunks:
            raise ValueError(f"feature width {C} is not divisible by chunks={chunks}")
        p = pred.unflatten(-1, (chunks, C // chunks))  # (B, N, chunks, C / chunks)
        t = target.unflatten(-1, (chunks, C // chunks))
        loss = loss + (1.0 - F.cosine_similarity(p, t, dim=-1)).mean()
    return loss


# ----------------------------------------------------------------------------- the whole objective


class TokenizerLoss(nn.Module):
    """Owns LPIPS and the discriminator; computes the generator and discriminator objectives.

    Args (defaults = the EvoTok release):
        rec_loss, rec_weight: pixel loss kind and weight.
        perceptual_weight: LPIPS weight (0 skips building LPIPS).
        lpips_vgg_path, lpips_heads_path, lpips_random_weights: see ``tokenizer.lpips.LPIPS``.
        lpips_fields: config field names for LPIPS error messages (vgg, heads).
        disc_weight, disc_start: GAN weight and the step from which the GAN terms are on.
        disc_adaptive: scale the generator GAN term by VQGAN's adaptive weight (needs ``last_layer``).
        disc_ndf, disc_layers, disc_norm: ``PatchDiscriminator`` shape.
        commit_weight: weight of the quantiser's commitment loss.
        semantic_weight, semantic_chunks: weight and fold count of ``semantic_loss``.
    """

    def __init__(self, *, rec_loss: Literal["mse", "l1"] = "mse", rec_weight: float = 1.0,
                 perceptual_weight: float = 1.0, lpips_vgg_path: str = "", lpips_heads_path: str = "",
                 lpips_random_weights: bool = False,
                 lpips_fields: tuple[str, str] = ("lpips_vgg_path", "lpips_heads_path"),
                 disc_weight: float = 0.5, disc_start: int = 20000, disc_adaptive: bool = False,
                 disc_ndf: int = 64, disc_layers: int = 3, disc_norm: Literal["batch", "group"] = "batch",
                 commit_weight: float = 1.0, semantic_weight: float = 1.0, semantic_chunks: int = 4):
        super().__init__()
        reconstruction_loss(torch.zeros(1), torch.zeros(1), rec_loss)  # validate the kind early
        self.rec_loss, self.rec_weight = rec_loss, rec_weight
        self.perceptual_weight = perceptual_weight
        self.lpips = (LPIPS(lpips_vgg_path, lpips_heads_path, random_weights=lpips_random_weights,
                            vgg_field=lpips_fields[0], heads_field=lpips_fields[1])
                      if perceptual_weight > 0 else None)
        self.discriminator = PatchDiscriminator(3, disc_ndf, disc_layers, disc_norm)
        self.disc_weight, self.disc_start, self.disc_adaptive = disc_weight, disc_start, disc_adaptive
        self.commit_weight = commit_weight
        self.semantic_weight, self.semantic_chunks = semantic_weight, semantic_chunks

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms are on at ``step`` (the discriminator step can be skipped before)."""
        return self.disc_weight > 0 and step >= self.disc_start

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor, commit_loss: torch.Tensor,
                       sem_pred: torch.Tensor | None, sem_target: torch.Tensor | None, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator loss and detached per-term tensors (weighted; ``gan_g`` unweighted, ``gan_weight``
        its weight). Tensors, not floats, so logging decides when to synchronise.

        images, recon (B, 3, H, W) in [-1, 1]; sem_pred, sem_target (B, N, C_t) or None (no semantic term).
        The discriminator's parameters receive no gradient from this loss.
        """
        rec = reconstruction_loss(recon, images, self.rec_loss) * self.rec_weight
        nll = rec
        logs = {"rec": rec.detach()}
        if self.lpips is not None:
            p = self.lpips(recon, images).mean() * self.perceptual_weight
            nll = nll + p
            logs["lpips"] = p.detach()
        total = nll + commit_loss * self.commit_weight
        logs["commit"] = commit_loss.detach() * self.commit_weight
        if sem_pred is not None and sem_target is not None:
            sem = semantic_loss(sem_pred, sem_target, self.semantic_chunks) * self.semantic_weight
            total = total + sem
            logs["semantic"] = sem.detach()
        if self.gan_active(step):
            with _no_param_grads(self.discriminator):
                g = hinge_g_loss(self.discriminator(recon))
            w = torch.tensor(self.disc_weight, device=recon.device)
            if self.disc_adaptive:
                if last_layer is None:
                    raise ValueError("disc_adaptive needs the pixel decoder's last_layer")
                w = w * adaptive_gan_weight(nll, g, last_layer)
            total = total + w * g
            logs["gan_g"] = g.detach()
            logs["gan_weight"] = w.detach()
        logs["total"] = total.detach()
        return total, logs

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted hinge loss of the discriminator on real images vs detached reconstructions (a zero
        tensor without graph before ``disc_start``)."""
        if not self.gan_active(step):
            return images.new_zeros(()), {}
        real = self.discriminator(images.detach())
        fake = self.discriminator(recon.detach())
        d = hinge_d_loss(real, fake) * self.disc_weight
        return d, {"disc": d.detach(), "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}
