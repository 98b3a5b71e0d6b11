"""Reconstruction evaluation (eval.recon, eval.inception): rFID against a direct scipy Fréchet computation,
metrics against skimage on the same uint8 pairs, folder = shards, ranks = one process, the ADM crop, the
FID Inception's weight layout and the errors for missing weights.

The per-image PSNR / SSIM functions themselves are checked against skimage in tests/test_metrics.py.
"""

from __future__ import annotations

import json
import math

import evaluate  # launch/ is on pytest's pythonpath
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image
from scipy import linalg

from data.schema import make_sample
from data.shard_writer import ShardWriter
from eval.inception import FIDInceptionV3, load_fid_inception
from eval.recon import ReconStats, load_image
from tokenizer.config import preset
from tokenizer.lpips import LPIPS
from tokenizer.model import EvoTokenizer
from unimllm.config import ConfigError
from unimllm.stages.reconstruction import accumulate_reconstruction, evaluate_reconstruction

skm = pytest.importorskip("skimage.metrics")

N_IMAGES = 10
SIZES = [(96, 80), (80, 64), (300, 170), (64, 64), (70, 130)]  # (W, H), mostly non-square; 300x170 BOX-halves


def _image(i: int) -> Image.Image:
    w, h = SIZES[i % len(SIZES)]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 3 + 25 * i, yy * 2 + 7 * i, (xx + yy) * 5 % 256], -1)
    noise = np.random.default_rng(i).normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """N_IMAGES PNGs as a folder and as one shard (same order), and a small random-init tokenizer saved and
    loaded back (K=64 codes, L_sem=4, L_pix=2)."""
    root = tmp_path_factory.mktemp("recon")
    folder = root / "images" / "sub"
    folder.mkdir(parents=True)
    with ShardWriter(str(root / "val-%06d.tar"), max_samples=100) as w:
        for i in range(N_IMAGES):
            _image(i).save(folder / f"im{i:02d}.png")
            w.write(make_sample(f"im{i:02d}", _image(i), {"task": "reconstruct"}))
    cfg = preset("tiny")
    cfg.quantizer.codebook_size, cfg.quantizer.depth_sem, cfg.quantizer.depth_pix = 64, 4, 2
    cfg.pixel_decoder.channels, cfg.pixel_decoder.z_channels = 16, 16
    cfg.pixel_decoder.channel_mult = (1, 1, 2, 2)
    cfg.encoder.hidden_size = cfg.teacher.hidden_size = 32
    cfg.semantic_decoder.width = 32
    torch.manual_seed(0)
    EvoTokenizer(cfg, with_teacher=False).save_pretrained(root / "tok")
    tok = EvoTokenizer.from_pretrained(root / "tok", with_teacher=False)
    return {"root": root, "folder": root / "images", "shards": str(root / "val-000000.tar"), "tok": tok}


def tiny_feature() -> nn.Module:
    """A deterministic random-init conv feature net (no ``num_features``: the wrapper probes it)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def frechet_scipy(f1: np.ndarray, f2: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance on two (N, d) feature sets (float64)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-12), k


# ------------------------------------------------------------------------------------------- rFID


def test_rfid_custom_feature_matches_scipy_frechet():
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.integers(0, 256, (48, 3, 32, 32), dtype=np.uint8))
    fake = torch.from_numpy(np.clip(real.numpy() * 0.5 + rng.normal(100, 40, real.shape), 0, 255).astype(np.uint8))
    net = tiny_feature()
    stats = ReconStats(codebook_size=4, depth_sem=1, feature=net, probe_size=32)
    codes = torch.zeros(16, 1, 1, 1, dtype=torch.long)
    for i in range(0, 48, 16):  # three updates: the sums accumulate across batches
        stats.update(real[i : i + 16], fake[i : i + 16], codes)
    with torch.no_grad():
        f_real = torch.cat([net(real[i : i + 16].float() / 255) for i in range(0, 48, 16)]).double().numpy()
        f_fake = torch.cat([net(fake[i : i + 16].float() / 255) for i in range(0, 48, 16)]).double().numpy()
    assert f_real.shape == (48, 12)  # N > d: full-rank covariances, a well-posed square root
    ref = frechet_scipy(f_real, f_fake)
    got = stats.compute()["rfid"]
    assert ref > 1e-3 and abs(got - ref) <= 1e-10 * ref  # relative 1e-10 (float64 end to end; seen 5e-16)
    assert stats.tensors()["fid.real_features_num_samples"] == 48


def test_fid_inception_layout_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    sd = net.state_dict()
    # pytorch-fid / torch-fidelity weight-file layout (checked key-for-key against torch-fidelity 0.4.0)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    assert sd["fc.weight"].shape == (1008, 2048) and "Mixed_7c.branch_pool.bn.running_var" in sd
    nbt = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # the file may lack these
    torch.save(nbt, tmp_path / "incep.pth")
    loaded = load_fid_inception(tmp_path / "incep.pth")
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        out = loaded(x)
        assert out.shape == (2, 2048) and torch.equal(out, net(x))
    with pytest.raises(ConfigError, match="inception_weights.*does not exist.*never downloaded"):
        load_fid_inception(tmp_path / "missing.pth")
    torchvision_like = {**nbt, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    torch.save(torchvision_like, tmp_path / "tv.pth")
    with pytest.raises(ConfigError, match="inception_weights.*torchvision"):
        load_fid_inception(tmp_path / "tv.pth")


# ------------------------------------------------------------------------------- pipeline metrics


def test_folder_metrics_in_range_match_skimage_and_shards(data):
    tok = data["tok"]
    stats = accumulate_reconstruction(tok, data["folder"], feature=tiny_feature(), keep_examples=N_IMAGES)
    m = stats.compute()
    assert m["n_images"] == N_IMAGES and m["depth"] == 2 and m["skipped"] == 0  # default depth = L_pix
    assert 0 < m["psnr"] < 100 and -1 <= m["ssim"] <= 1 and m["ssim"] < m["ssim_llamagen"] <= 1
    assert m["rfid"] > 0 and "lpips" not in m
    for d in range(1, 5):  # every stage of the encoded codes, whatever depth is decoded
        assert 0 < m[f"usage_d{d}"] <= 1 and 1 <= m[f"perplexity_d{d}"] <= 64
        assert m[f"usage_d{d}"] * 64 >= m[f"perplexity_d{d}"] - 1e-9  # perplexity <= number of codes used
    # the aggregates are the mean of skimage's per-image values on the same uint8 pairs
    orig, rec = stats.examples
    assert orig.shape == rec.shape == (N_IMAGES, 3, 64, 64) and orig.dtype == rec.dtype == torch.uint8
    a = [o.permute(1, 2, 0).numpy() / 255 for o in orig]
    b = [r.permute(1, 2, 0).numpy() / 255 for r in rec]
    ref = {"psnr": [skm.peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b)],
           "ssim": [skm.structural_similarity(x, y, channel_axis=-1, data_range=1.0, gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False) for x, y in zip(a, b)],
           "ssim_llamagen": [skm.structural_similarity(x, y, channel_axis=-1, data_range=2.0) for x, y in zip(a, b)]}
    for k, v in ref.items():
        assert m[k] == pytest.approx(np.mean(v), abs=1e-5), k
    # the same images from a shard, in the same batches, give the same numbers (PNG: no JPEG draft decode)
    shard = evaluate_reconstruction(tok, data["shards"], feature=tiny_feature())
    close(shard, m, rel=1e-9)


def test_depth_changes_reconstruction_and_is_validated(data):
    tok = data["tok"]
    m1 = evaluate_reconstruction(tok, data["folder"], depth=1, max_images=4)
    m4 = evaluate_reconstruction(tok, data["folder"], depth=4, max_images=4)
    assert m1["depth"] == 1 and m4["depth"] == 4 and m1["n_images"] == m4["n_images"] == 4
    assert m1["psnr"] != m4["psnr"] and m1["ssim"] != m4["ssim"]
    assert all(m1[f"usage_d{d}"] == m4[f"usage_d{d}"] for d in range(1, 5))  # same codes, other decode
    with pytest.raises(ValueError, match="depth 5 outside 1..4"):
        evaluate_reconstruction(tok, data["folder"], depth=5)


def test_inception_weights_end_to_end_and_missing_file_is_a_clear_error(data, tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "incep.pth")  # random weights: the path, not the value
    m = evaluate_reconstruction(data["tok"], data["folder"], inception_weights=tmp_path / "incep.pth", max_images=3)
    assert m["n_images"] == 3 and math.isfinite(m["rfid"]) and m["rfid"] >= 0
    with pytest.raises(ConfigError, match="inception_weights: .*nope.pth does not exist"):
        evaluate_reconstruction(data["tok"], data["folder"], inception_weights=tmp_path / "nope.pth")
    argv = ["--suite", "recon", "--ckpt", str(data["root"] / "tok"), "--recon.source", str(data["folder"]),
            "--out", str(tmp_path / "e")]  # the command: launch/evaluate.py --suite recon
    with pytest.raises(ConfigError, match="inception_weights: .*nope.pth does not exist"):
        evaluate.main([*argv, "--recon.inception_weights", str(tmp_path / "nope.pth")])
    with pytest.raises(ConfigError, match="recon.lpips_vgg: .*vgg.pth does not exist"):
        evaluate.main([*argv, "--recon.lpips_vgg", str(tmp_path / "vgg.pth")])


def test_cli_writes_metrics_and_grid_with_lpips(data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    lp = LPIPS(random_weights=True)
    m = evaluate_reconstruction(data["tok"], data["folder"], lpips=lp, max_images=2, grid_path=tmp_path / "g.png",
                                grid_images=2)
    assert m["lpips"] > 0 and Image.open(tmp_path / "g.png").size == (2 * 64, 2 * 64)
    out = tmp_path / "out"
    evaluate.main(["--suite", "recon", "--ckpt", str(data["root"] / "tok"), "--recon.source", data["shards"],
                   "--recon.max_images", "3", "--recon.depth", "3", "--out", str(out)])
    saved = json.loads((out / "scores.json").read_text())["recon"]
    assert saved["n_images"] == 3 and saved["depth"] == 3 and "rfid" not in saved
    assert Image.open(out / "recon_grid.png").size == (3 * 64, 2 * 64)


def test_unreadable_images_are_skipped_and_counted(data, tmp_path):
    for i in range(2):
        _image(i).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    m = evaluate_reconstruction(data["tok"], tmp_path)
    assert m["n_images"] == 2 and m["skipped"] == 1
    (tmp_path / "ok0.png").unlink()
    (tmp_path / "ok1.png").unlink()
    with pytest.raises(ValueError, match="no image could be evaluated"):
        evaluate_reconstruction(data["tok"], tmp_path)


def test_adm_center_crop_matches_guided_diffusion(tmp_path):
    def center_crop_arr(pil_image, image_size):  # guided-diffusion image_datasets.py, verbatim
        while min(*pil_image.size) >= 2 * image_size:
            pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
        scale = image_size / min(*pil_image.size)
        pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
        arr = np.array(pil_image)
        crop_y = (arr.shape[0] - image_size) // 2
        crop_x = (arr.shape[1] - image_size) // 2
        return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]

    for i, (size, res) in enumerate([((300, 170), 64), ((170, 301), 64), ((97, 61), 32), ((513, 260), 128)]):
        img = _image(i).resize(size)
        img.save(tmp_path / f"{i}.png")
        assert np.array_equal(load_image(tmp_path / f"{i}.png", res).numpy(), center_crop_arr(img, res)), size


# ----------------------------------------------------------------------------------- distribution


# batch_size=1 everywhere: the tokenizer's CPU kernels are not batch-invariant (other batch compositions move
# its output by ~4e-6 and flip ~1e-4 of the uint8 pixels, so metrics by ~1e-6), and what is tested here is
# the reduction, which must then agree to float64 summation order.


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_two_rank_shares_merge_to_the_single_process_result(data, kind):
    tok, src = data["tok"], data[kind]
    for max_images in (None, 7):
        single = evaluate_reconstruction(tok, src, feature=tiny_feature(), batch_size=1, max_images=max_images)
        shares = [accumulate_reconstruction(tok, src, feature=tiny_feature(), batch_size=1, max_images=max_images,
                                            rank=r, world_size=2) for r in range(2)]
        assert sum(int(s.sums["n"]) for s in shares) == single["n_images"] == (max_images or N_IMAGES)
        assert all(int(s.sums["n"]) > 0 for s in shares)
        shares[0].merge(shares[1].tensors())
        close(shares[0].compute(), single, rel=1e-9)
    with pytest.raises(ValueError, match="initialised process group"):
        evaluate_reconstruction(tok, src, rank=0, world_size=2)


def _gloo_rank(rank: int, store: str, tok_dir: str, src: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        tok = EvoTokenizer.from_pretrained(tok_dir, with_teacher=False)
        m = evaluate_reconstruction(tok, src, feature=tiny_feature(), batch_size=1, rank=rank, world_size=2)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(m, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 7-22 s on a shared 2-core CPU, mostly two fresh interpreters importing torch
def test_gloo_two_ranks_equal_single_process(data, tmp_path):
    single = evaluate_reconstruction(data["tok"], data["folder"], feature=tiny_feature(), batch_size=1)
    out = tmp_path / "m.json"
    mp.spawn(_gloo_rank, args=(str(tmp_path / "store"), str(data["root"] / "tok"), str(data["folder"]), str(out)),
             nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"m.json.{r}").read_text()) for r in range(2))
    assert r0 == r1  # every rank gets the reduced result
    close(r0, single, rel=1e-9)
    assert not math.isnan(r0["rfid"])
