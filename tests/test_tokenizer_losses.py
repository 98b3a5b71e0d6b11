"""Tokenizer losses: LPIPS (weights loading, invariants), PatchGAN + hinge, semantic cosine, the full objective."""

from __future__ import annotations

import pytest
import torch

from tokenizer.losses import (
    PatchDiscriminator,
    TokenizerLoss,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
    semantic_loss,
)
from tokenizer.lpips import LPIPS, VGG16Features
from unimllm.config import ConfigError


def _images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def lpips_random() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(random_weights=True)


# ----------------------------------------------------------------------------- LPIPS


def test_lpips_random_weights_invariants(lpips_random):
    x, y = _images(seed=1), _images(seed=2)
    assert torch.equal(lpips_random(x, x), torch.zeros(2))
    d = lpips_random(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert not any(p.requires_grad for p in lpips_random.parameters())
    lpips_random.train()
    assert not lpips_random.training
    # the distance is differentiable w.r.t. the reconstruction
    r = y.clone().requires_grad_(True)
    lpips_random(r, x).sum().backward()
    assert r.grad is not None and r.grad.abs().sum() > 0


def test_lpips_loads_torchvision_vgg_and_reference_heads(tmp_path, lpips_random):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    vgg = VGG16Features().state_dict()  # torchvision's `features.N.*` keys
    tv = {**vgg, "classifier.0.weight": torch.zeros(4, 2), "classifier.0.bias": torch.zeros(4)}
    torch.save(tv, tmp_path / "vgg16.pth")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    save_file(heads, str(tmp_path / "heads.safetensors"))
    m = LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "heads.safetensors"))
    assert torch.equal(m.net.features[28].weight, vgg["features.28.weight"])
    assert torch.equal(m.lin3.model[1].weight, heads["lin3.model.1.weight"])
    # the LPIPS package's own naming in one file: net.sliceK.N.* and heads without dropout (model.0)
    slices = {3: 1, 8: 2, 15: 3, 22: 4, 29: 5}
    full = {}
    for k, v in vgg.items():
        idx = int(k.split(".")[1])
        full[f"net.slice{next(s for end, s in slices.items() if idx <= end)}.{k.split('.', 1)[1]}"] = v
    full |= {k.replace("model.1", "model.0"): v for k, v in heads.items()}
    torch.save(full, tmp_path / "lpips_full.pth")
    m2 = LPIPS(str(tmp_path / "lpips_full.pth"), str(tmp_path / "lpips_full.pth"))
    x, y = _images(seed=3), _images(seed=4)
    torch.testing.assert_close(m2(x, y), m(x, y), rtol=0, atol=0)


def test_lpips_missing_or_bad_files_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"stage1\.loss\.lpips_vgg: .*nope\.pth does not exist"):
        LPIPS(str(tmp_path / "nope.pth"), "", vgg_field="stage1.loss.lpips_vgg")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r"lpips_vgg_path: weights do not fit LPIPS: missing"):
        LPIPS(str(tmp_path / "partial.pth"), str(tmp_path / "partial.pth"))


# ----------------------------------------------------------------------------- GAN


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # real: relu(1 - r) = (0, 0.5, 2) -> 5/6; fake: relu(1 + f) = (0, 1, 2) -> 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 1.0)))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(1.0 / 3))
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)) == 0


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_patch_discriminator_layout(norm):
    d = PatchDiscriminator(ndf=8, n_layers=3, norm=norm)
    assert d(_images(2, 64)).shape == (2, 1, 6, 6)
    keys = d.state_dict().keys()
    # the reference's nn.Sequential indices: convs at 0, 2, 5, 8, 11; norms at 3, 6, 9
    assert {"main.0.bias", "main.2.weight", "main.3.weight", "main.11.weight", "main.11.bias"} <= set(keys)
    assert "main.2.bias" not in keys
    assert abs(float(d.main[2].weight.detach().std()) - 0.02) < 0.005


def test_adaptive_gan_weight_is_a_grad_norm_ratio():
    w = torch.ones(3, requires_grad=True)
    ratio = adaptive_gan_weight((2 * w).sum(), w.sum(), w)
    torch.testing.assert_close(ratio, torch.tensor(2 * 3**0.5 / (3**0.5 + 1e-4)))
    assert adaptive_gan_weight(w.sum(), (0 * w).sum(), w) == 1e4  # clamped


# ----------------------------------------------------------------------------- regression losses


def test_semantic_loss_by_hand():
    x = torch.randn(2, 5, 16)
    assert semantic_loss(x, x.clone()).abs() < 1e-6
    pred = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    # full cosine 1/2 -> 0.5; two chunks: [1,0].[1,0] -> 0 and [0,1].[1,0] -> 1, mean 0.5
    torch.testing.assert_close(semantic_loss(pred, target, chunks=2), torch.tensor(1.0))
    torch.testing.assert_close(semantic_loss(pred, target, chunks=1), torch.tensor(0.5))
    torch.testing.assert_close(semantic_loss(2 * pred, 3 * target, chunks=2), torch.tensor(1.0))  # scale-free
    with pytest.raises(ValueError, match="divisible"):
        semantic_loss(torch.randn(1, 2, 6), torch.randn(1, 2, 6), chunks=4)


def test_reconstruction_loss_kinds():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    assert reconstruction_loss(a, b, "mse") == 4.0 and reconstruction_loss(a, b, "l1") == 2.0
    with pytest.raises(ValueError):
        reconstruction_loss(a, b, "l3")


# ----------------------------------------------------------------------------- the objective


def test_tokenizer_loss_generator_and_discriminator_steps():
    torch.manual_seed(0)
    loss = TokenizerLoss(lpips_random_weights=True, disc_ndf=8, disc_layers=2, disc_start=10, disc_norm="group")
    images = _images(2)
    recon = (images + 0.3 * torch.randn_like(images)).requires_grad_(True)
    sem_pred, sem_target = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 4, 8)
    commit = torch.tensor(0.25)
    total, logs = loss.generator_loss(images, recon, commit, sem_pred, sem_target, step=0)
    assert "gan_g" not in logs and set(logs) == {"rec", "lpips", "commit", "semantic", "total"}
    torch.testing.assert_close(total, logs["rec"] + logs["lpips"] + logs["commit"] + logs["semantic"])
    d_loss, d_logs = loss.discriminator_loss(images, recon, step=0)
    assert d_loss == 0 and not d_loss.requires_grad and not d_logs
    total, logs = loss.generator_loss(images, recon, commit, sem_pred, sem_target, step=10)
    assert "gan_g" in logs and float(logs["gan_weight"]) == 0.5
    total.backward()
    assert recon.grad is not None and sem_pred.grad is not None
    assert all(p.grad is None for p in loss.discriminator.parameters())  # generator loss leaves D alone
    d_loss, d_logs = loss.discriminator_loss(images, recon, step=10)
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert set(d_logs) == {"disc", "logits_real", "logits_fake"}
