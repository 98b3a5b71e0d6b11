"""EvoTokenizer model: shapes, frozen teacher, save/load round trip, pretrained towers, official conversion."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time

import pytest
import torch

from tokenizer.config import TokenizerConfig, VisionTowerConfig, preset
from tokenizer.decoders import PixelDecoder, SemanticDecoder
from tokenizer.encoder import VisionTower
from tokenizer.model import EvoTokenizer
from unimllm.config import ConfigError


def _images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def _micro() -> TokenizerConfig:
    """The tiny preset with a narrower pixel decoder (same shapes, ~4x cheaper on CPU)."""
    cfg = preset("tiny")
    return dataclasses.replace(cfg, pixel_decoder=dataclasses.replace(cfg.pixel_decoder, channels=32, z_channels=32))


def _tiny(seed: int = 0, cfg: TokenizerConfig | None = None, **kw) -> EvoTokenizer:
    torch.manual_seed(seed)
    return EvoTokenizer(cfg or _micro(), **kw)


def _siglip(cfg: VisionTowerConfig, seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    hf = SiglipVisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            intermediate_size=cfg.intermediate_size)
    return SiglipVisionModel(hf).eval()


@pytest.fixture(scope="module")
def tiny() -> EvoTokenizer:
    return _tiny()


# ----------------------------------------------------------------------------- shapes


def test_decoders_standalone_shapes():
    cfg = preset("tiny")
    z = torch.randn(2, 8, 8, cfg.quantizer.dim)  # (B, h, w, D)
    assert PixelDecoder(cfg.pixel_decoder, cfg.quantizer.dim)(z).shape == (2, 3, 64, 64)
    sem = SemanticDecoder(dataclasses.replace(cfg.semantic_decoder, num_heads=3, head_dim=20), cfg.quantizer.dim, 48, 8)
    assert sem.blocks[0].attn.qkv.weight.shape == (180, cfg.semantic_decoder.width)  # 3 x (3 heads x 20)
    assert sem(z).shape == (2, 64, 48)


def test_tiny_forward_backward_shapes():
    model = _tiny(cfg=preset("tiny")).train()
    cfg, x = model.cfg, _images(1)
    out = model(x)
    L, D = cfg.quantizer.depth_sem, cfg.quantizer.dim
    assert out.recon.shape == (1, 3, 64, 64)
    assert out.sem_pred.shape == (1, 64, cfg.teacher.hidden_size)
    assert out.codes.shape == (1, 8, 8, L) and out.codes.dtype == torch.long
    assert out.z.shape == (1, 8, 8, D) and out.commit_loss.ndim == 0
    target = model.teacher_features(x)
    assert target.shape == out.sem_pred.shape and not target.requires_grad
    loss = out.recon.square().mean() + (out.sem_pred - target).square().mean() + out.commit_loss
    loss.backward()
    params = model.trainable_parameters()
    assert params and all(p.grad is not None for p in params)
    assert all(p.grad is None for p in model.teacher.parameters())


def test_encode_decode_shapes_at_several_depths(tiny):
    x = _images(1)
    codes = tiny.encode(x)
    L = tiny.cfg.quantizer.depth_sem
    assert codes.shape == (1, 8, 8, L)
    for depth in (1, L):
        assert tiny.decode_pixels(codes, depth).shape == (1, 3, 64, 64)
    assert tiny.decode_pixels(codes[..., :4]).shape == (1, 3, 64, 64)  # default depth = L_pix
    sem = tiny.semantic_features(codes)
    assert sem.shape == (1, 64, tiny.cfg.teacher.hidden_size)
    torch.testing.assert_close(tiny.semantic_features(x), sem)


def test_teacher_frozen_and_excluded(tiny):
    assert all(not p.requires_grad for p in tiny.teacher.parameters())
    trainable = {id(p) for p in tiny.trainable_parameters()}
    assert not trainable & {id(p) for p in tiny.teacher.parameters()}
    tiny.train()
    assert tiny.training and not tiny.teacher.training
    # encoder: the layer after the feature layer, post_layernorm and head are frozen, the rest trains
    tower = tiny.encoder.tower.model
    assert not any(p.requires_grad for p in tower.encoder.layers[-1].parameters())
    assert not any(p.requires_grad for p in tower.post_layernorm.parameters())
    assert all(p.requires_grad for p in tower.encoder.layers[0].parameters())
    tiny.eval()


# ----------------------------------------------------------------------------- save / load


def test_save_pretrained_round_trip(tmp_path):
    model = _tiny(seed=3).train()
    model.quantizer(torch.randn(64, model.cfg.quantizer.dim))  # a training forward: EMA buffers move
    assert int(model.quantizer.step) == 1
    model.eval()
    out_dir = model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    loaded = EvoTokenizer.from_pretrained(out_dir)
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = _images(1, seed=2)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.sem_pred, b.sem_pred)
    light = EvoTokenizer.from_pretrained(out_dir, with_teacher=False)
    assert light.teacher is None
    torch.testing.assert_close(light.semantic_features(x), loaded.semantic_features(x), rtol=0, atol=0)


def test_missing_pretrained_dir_names_the_field(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"tokenizer\.encoder\.pretrained: .*nope does not exist"):
        EvoTokenizer(dataclasses.replace(preset("tiny"), encoder=VisionTowerConfig(pretrained=missing)))
    with pytest.raises(ConfigError, match=r"^model\.teacher\.pretrained: .*nope does not exist"):
        EvoTokenizer(dataclasses.replace(preset("tiny"), teacher=VisionTowerConfig(pretrained=missing)),
                     config_key="model")
    with pytest.raises(ConfigError, match=r"tokenizer\.teacher\.pretrained"):
        VisionTower(VisionTowerConfig(pretrained=missing), config_key="tokenizer.teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"encoder\.pretrained: .*empty has no config\.json"):
        VisionTower(VisionTowerConfig(pretrained=str(tmp_path / "empty")))


@pytest.mark.parametrize("layout", ["vision", "siglip_full"])
def test_pretrained_tower_matches_hf_penultimate(tmp_path, layout):
    cfg = VisionTowerConfig()
    ref = _siglip(cfg, seed=5)
    if layout == "vision":
        ref.save_pretrained(tmp_path / "siglip")
    else:  # a full SigLIP (text + vision) directory, as google/siglip2-* ships
        from transformers import SiglipConfig, SiglipModel

        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
        full = SiglipModel(SiglipConfig(vision_config=ref.config.to_dict(), text_config=text))
        full.vision_model.load_state_dict(ref.state_dict())
        full.save_pretrained(tmp_path / "siglip")
    tower = VisionTower(VisionTowerConfig(pretrained=str(tmp_path / "siglip"), image_size=224, hidden_size=8))
    assert tower.hidden_size == cfg.hidden_size and tower.grid_size == 8  # the directory's config wins
    x = _images(2)
    with torch.no_grad():
        expect = ref(x, output_hidden_states=True).hidden_states[-2]  # (B, N, C)
        got = tower(x)  # (B, h, w, C)
    assert got.shape == (2, 8, 8, cfg.hidden_size)
    torch.testing.assert_close(got.flatten(1, 2), expect, rtol=1e-5, atol=1e-5)
    assert tower.resolved_config() == dataclasses.replace(cfg, pretrained="")


def test_pretrained_tokenizer_saves_standalone(tmp_path):
    cfg = _micro()
    _siglip(cfg.encoder, seed=1).save_pretrained(tmp_path / "enc")
    _siglip(cfg.teacher, seed=2).save_pretrained(tmp_path / "teach")
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, pretrained=str(tmp_path / "enc")),
                              teacher=dataclasses.replace(cfg.teacher, pretrained=str(tmp_path / "teach")))
    model = EvoTokenizer(cfg).eval()
    model.save_pretrained(tmp_path / "tok")
    saved = json.loads((tmp_path / "tok/config.json").read_text())
    assert saved["encoder"]["pretrained"] == "" and saved["teacher"]["pretrained"] == ""
    shutil.rmtree(tmp_path / "enc")
    shutil.rmtree(tmp_path / "teach")
    loaded = EvoTokenizer.from_pretrained(tmp_path / "tok")
    x = _images(1)
    torch.testing.assert_close(loaded.teacher_features(x), model.teacher_features(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- official conversion


def _fake_official_state_dict(cfg: TokenizerConfig) -> dict[str, torch.Tensor]:
    """Key names and shapes of the official ``EvoTok`` module (evotok/tokenizer/vq_model/evotok.py,
    pixel_model.py, vqkd_model.py, quantizer/shared_rq_quantizer.py), here for a tiny config."""
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {}
    D, K, L = cfg.quantizer.dim, cfg.quantizer.codebook_size, cfg.quantizer.depth_sem
    # encoder_vqkd = SiglipVisionModel (transformers 4.x layout: a `vision_model` wrapper)
    for k, v in _siglip(cfg.encoder).state_dict().items():
        shapes[f"encoder_vqkd.vision_model.{k}"] = tuple(v.shape)
    C = cfg.encoder.hidden_size
    shapes |= {"encode_task_layer.0.weight": (C, C), "encode_task_layer.0.bias": (C,),
               "encode_task_layer.2.weight": (D, C), "encode_task_layer.2.bias": (D,)}
    # quantize = SharedResidualQuantizer: one VQEmbedding (K + 1 rows, padding last) per stage
    for i in range(L):
        shapes |= {f"quantize.codebooks.{i}.weight": (K + 1, D), f"quantize.codebooks.{i}.cluster_size_ema": (K,),
                   f"quantize.codebooks.{i}.embed_ema": (K, D), f"quantize.codebooks.{i}.step": ()}
    shapes["quantize.codebook_used"] = (131072, L)
    # post_quant_conv + Decoder(ch, ch_mult, z_channels, num_res_blocks)
    p = cfg.pixel_decoder
    Z, ch, mult = p.z_channels, p.channels, p.channel_mult
    shapes |= {"post_quant_conv.weight": (Z, D, 1, 1), "post_quant_conv.bias": (Z,)}

    def norm(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)})

    def conv(prefix, cin, cout, k):
        shapes.update({f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)})

    def resnet(prefix, cin, cout):
        norm(f"{prefix}.norm1", cin), conv(f"{prefix}.conv1", cin, cout, 3)
        norm(f"{prefix}.norm2", cout), conv(f"{prefix}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{prefix}.nin_shortcut", cin, cout, 1)

    def attn(prefix, c):
        norm(f"{prefix}.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.{n}", c, c, 1)

    block_in = ch * mult[-1]
    conv("decoder.conv_in", Z, block_in, 3)
    resnet("decoder.mid.0", block_in, block_in), attn("decoder.mid.1", block_in), resnet("decoder.mid.2", block_in, block_in)
    for j, level in enumerate(reversed(range(len(mult)))):
        block_out = ch * mult[level]
        for r in range(p.num_res_blocks + 1):
            resnet(f"decoder.conv_blocks.{j}.res.{r}", block_in, block_out)
            block_in = block_out
            if level == len(mult) - 1:
                attn(f"decoder.conv_blocks.{j}.attn.{r}", block_in)
        if level != 0:
            conv(f"decoder.conv_blocks.{j}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, 3, 3)
    # decoder_vqkd = BEiT VisionTransformer(patch_size=1, in_chans=D, num_classes=0) + decode_task_layer
    s = cfg.semantic_decoder
    W, inner, N = s.width, s.num_heads * (s.head_dim or s.width // s.num_heads), (cfg.encoder.image_size // cfg.encoder.patch_size) ** 2
    conv("decoder_vqkd.patch_embed.proj", D, W, 1)
    shapes |= {"decoder_vqkd.cls_token": (1, 1, W), "decoder_vqkd.pos_embed": (1, N + 1, W)}
    for b in range(s.depth):
        pre = f"decoder_vqkd.blocks.{b}"
        norm(f"{pre}.norm1", W), norm(f"{pre}.norm2", W)
        shapes |= {f"{pre}.attn.qkv.weight": (3 * inner, W), f"{pre}.attn.q_bias": (inner,),
                   f"{pre}.attn.v_bias": (inner,), f"{pre}.attn.proj.weight": (W, inner), f"{pre}.attn.proj.bias": (W,),
                   f"{pre}.mlp.fc1.weight": (int(W * s.mlp_ratio), W), f"{pre}.mlp.fc1.bias": (int(W * s.mlp_ratio),),
                   f"{pre}.mlp.fc2.weight": (W, int(W * s.mlp_ratio)), f"{pre}.mlp.fc2.bias": (W,)}
    norm("decoder_vqkd.fc_norm", W)
    T = cfg.teacher.hidden_size
    shapes |= {"decode_task_layer.0.weight": (W, W), "decode_task_layer.0.bias": (W,),
               "decode_task_layer.2.weight": (T, W), "decode_task_layer.2.bias": (T,),
               "scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1)}
    sd = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
    for i in range(L):
        sd[f"quantize.codebooks.{i}.step"] = torch.tensor(1234)
        sd[f"quantize.codebooks.{i}.cluster_size_ema"] = sd[f"quantize.codebooks.{i}.cluster_size_ema"].abs()
    return sd


def test_convert_official_checkpoint(tmp_path, capsys):
    from tokenizer.convert import main

    cfg = preset("tiny")
    sd = _fake_official_state_dict(cfg)
    q = cfg.quantizer
    args = argparse.Namespace(codebook_size=q.codebook_size, codebook_embed_dim=q.dim, vqgan_depth=q.depth_pix,
                              vqkd_depth=q.depth_sem, teacher="siglip_256")
    torch.save({"model": sd, "args": args, "steps": 1234}, tmp_path / "official.pt")
    teacher = _siglip(cfg.teacher, seed=9)
    teacher.save_pretrained(tmp_path / "siglip")
    rc = main(["--src", str(tmp_path / "official.pt"), "--out", str(tmp_path / "ours"), "--preset", "tiny",
               "--teacher", str(tmp_path / "siglip")])
    report = capsys.readouterr().out
    assert rc == 0, report
    for problem in ("missing", "unexpected", "shape_mismatch", "config_mismatch"):
        assert f"  {problem} (0)" in report, report
    model = EvoTokenizer.from_pretrained(tmp_path / "ours")
    ours = model.state_dict()
    assert torch.equal(ours["quantizer.codebook"][2, 5], sd["quantize.codebooks.2.weight"][5])
    assert torch.equal(ours["quantizer.embed_sum"][7], sd["quantize.codebooks.7.embed_ema"])
    assert int(ours["quantizer.step"]) == 1234
    assert torch.equal(ours["pixel_decoder.conv_blocks.1.res.0.conv1.weight"], sd["decoder.conv_blocks.1.res.0.conv1.weight"])
    assert torch.equal(ours["pixel_decoder.post_quant_conv.weight"], sd["post_quant_conv.weight"])
    assert torch.equal(ours["encoder.tower.model.encoder.layers.1.mlp.fc2.weight"],
                       sd["encoder_vqkd.vision_model.encoder.layers.1.mlp.fc2.weight"])
    assert torch.equal(ours["encoder.pre_quant.2.weight"], sd["encode_task_layer.2.weight"])
    inner = sd["decoder_vqkd.blocks.1.attn.q_bias"].numel()
    qkv_bias = ours["semantic_decoder.blocks.1.attn.qkv.bias"]
    assert torch.equal(qkv_bias[:inner], sd["decoder_vqkd.blocks.1.attn.q_bias"])
    assert not qkv_bias[inner:2 * inner].any()
    assert torch.equal(qkv_bias[2 * inner:], sd["decoder_vqkd.blocks.1.attn.v_bias"])
    assert torch.equal(ours["semantic_decoder.norm.weight"], sd["decoder_vqkd.fc_norm.weight"])
    assert torch.equal(ours["semantic_decoder.head.2.weight"], sd["decode_task_layer.2.weight"])
    assert torch.equal(ours["teacher.model.encoder.layers.0.self_attn.q_proj.weight"],
                       teacher.state_dict()["encoder.layers.0.self_attn.q_proj.weight"])
    # a wrong preset is reported, not silently written
    rc = main(["--src", str(tmp_path / "official.pt"), "--out", str(tmp_path / "bad"), "--preset", "tiny",
               "--no_teacher"])
    assert rc == 0  # teacher not expected with --no_teacher
    del sd["decoder.conv_out.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"model": sd, "args": args}, tmp_path / "broken.pt")
    rc = main(["--src", str(tmp_path / "broken.pt"), "--out", str(tmp_path / "broken"), "--preset", "tiny",
               "--no_teacher"])
    report = capsys.readouterr().out
    assert rc == 1 and not (tmp_path / "broken").exists()
    assert "pixel_decoder.conv_out.bias" in report and "decoder.extra.weight" in report


# ----------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_base256_forward_backward_cpu():
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = EvoTokenizer(preset("base-256")).train()
    built = time.perf_counter()
    x = _images(1, 256)
    out = model(x)
    target = model.teacher_features(x)
    loss = out.recon.square().mean() + (1 - torch.cosine_similarity(out.sem_pred, target, dim=-1)).mean() + out.commit_loss
    loss.backward()
    done = time.perf_counter()
    assert out.recon.shape == (1, 3, 256, 256) and out.sem_pred.shape == (1, 256, 1024)
    assert out.codes.shape == (1, 16, 16, 16)
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    print(f"\nbase-256: build {built - t0:.1f}s, forward+backward {done - built:.1f}s, params {n}, "
          f"trainable {sum(p.numel() for p in model.trainable_parameters())}")
