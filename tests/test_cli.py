"""The ``unimllm`` command line on tiny real checkpoints: every subcommand's outputs against the library
(tokenizer reconstructions and codes, pipeline replies and images), info fields, wrong-kind / missing-file
errors (exit status 2, one line naming the path), the installed console script, and (slow) exports of real
stage-1 / stage-2 / stage-3 (LoRA) training checkpoints and of a DeepSpeed ZeRO-3 checkpoint, compared tensor for
tensor with the exports the trainer wrote."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import stage1  # launch/ is on pytest's pythonpath
import stage2
import torch
from conftest import ROOT, save_tiny_tokenizer, save_tiny_unified
from PIL import Image
from safetensors.torch import load_file
from test_stage1 import SMALL as STAGE1_SMALL
from test_stage2 import args as stage2_args

from data.transforms import denormalize, normalize
from eval.metrics import psnr
from tokenizer.model import EvoTokenizer
from unimllm.checkpoint import CheckpointError
from unimllm.stages.artifacts import tokenizer_fingerprint
from unimllm.stages.cli import main
from unimllm.stages.pipeline import UnifiedPipeline
from unimllm.stages.reconstruction import read_image

QUESTION = "Is there a red circle in the image? Please answer yes or no."


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny tokenizer export (tok/), a tiny unified export over it (unified/) and three images, one in a subfolder."""
    out = tmp_path_factory.mktemp("cli_models")
    tok = save_tiny_tokenizer(out / "tok")
    save_tiny_unified(out / "unified", tok, out / "tok")
    (out / "images" / "sub").mkdir(parents=True)
    for i, (w, h) in enumerate([(80, 64), (64, 64), (64, 96)]):  # not all square: center-cropped to 64
        arr = np.full((h, w, 3), 30 * i, np.uint8)
        arr[h // 4: h // 2, w // 4: w // 2] = (200, 40 + 50 * i, 60)
        Image.fromarray(arr).save(out / "images" / ("sub" if i == 2 else "") / f"im{i}.png")
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    got = capsys.readouterr()
    return rc, got.out, got.err


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)


def assert_same_export(ours: Path, theirs: Path) -> None:
    """Same files; equal tensors (and dtypes) in every safetensors file, equal JSON, identical other bytes."""
    files = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".safetensors":
            assert tensors_equal(ours / rel, theirs / rel), rel
        elif rel.suffix == ".json":
            assert json.loads((ours / rel).read_text()) == json.loads((theirs / rel).read_text()), rel
        else:
            assert (ours / rel).read_bytes() == (theirs / rel).read_bytes(), rel


# ----------------------------------------------------------------------------- tokenizer commands


def test_reconstruct_writes_pngs_and_prints_psnr(models, tmp_path, capsys):
    imgs = models / "images"
    rc, out, _ = cli(capsys, "reconstruct", "--tokenizer", models / "tok", imgs / "im0.png", imgs / "sub", "--out",
                     tmp_path / "rec", "--depth", "2", "--device", "cpu")
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "rec").rglob("*.png")) == ["im0.png", "im2.png"]  # file: name; folder: inside
    metrics = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["depth"] == 2 and metrics["skipped"] == []

    tok = EvoTokenizer.from_pretrained(models / "tok", with_teacher=False)
    real = torch.stack([read_image(imgs / "im0.png", 64), read_image(imgs / "sub" / "im2.png", 64)])
    rec = tok.decode_pixels(tok.encode(normalize(real)), 2).clamp(-1, 1)
    expected_psnr = psnr(torch.from_numpy(denormalize(rec)).movedim(-1, 1) / 255, real.movedim(-1, 1) / 255)
    for name, want, ref in zip(("im0.png", "im2.png"), denormalize(rec), expected_psnr):
        with Image.open(tmp_path / "rec" / name) as img:
            assert img.size == (64, 64)
            assert np.array_equal(np.asarray(img), want)
        row = next(r for r in metrics["per_image"] if r["image"] == name)
        assert row["psnr"] == pytest.approx(float(ref), rel=1e-5)
        assert f"{name}: PSNR {row['psnr']:.2f} dB" in out



def test_reconstruct_skips_and_reports_an_unreadable_image(models, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "ok.png").write_bytes((models / "images" / "im1.png").read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    rc, _, err = cli(capsys, "reconstruct", "--tokenizer", models / "tok", folder, "--out", tmp_path / "rec",
                     "--device", "cpu")
    m = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert rc == 0 and m["images"] == 1 and len(m["skipped"]) == 1 and "broken.png" in m["skipped"][0]["image"]
    assert "skipped" in err and "broken.png" in err and [p.name for p in (tmp_path / "rec").glob("*.png")] == ["ok.png"]

def test_encode_codes_equal_the_tokenizers(models, tmp_path, capsys):
    imgs = models / "images"
    # --tokenizer may also be a unified export: its (sha256-checked) tokenizer encodes
    rc, out, _ = cli(capsys, "encode", "--tokenizer", models / "unified", imgs, "--out", tmp_path / "c" / "codes.npy",
                     "--batch", "2", "--device", "cpu")
    assert rc == 0 and "codes (3, 8, 8, 8) uint16" in out
    codes = np.load(tmp_path / "c" / "codes.npy", allow_pickle=False)
    files = [imgs / "im0.png", imgs / "im1.png", imgs / "sub" / "im2.png"]  # folder order: sorted, recursive
    tok = EvoTokenizer.from_pretrained(models / "tok", with_teacher=False)
    expected = tok.encode(normalize(torch.stack([read_image(f, 64) for f in files])))
    assert codes.shape == (3, 8, 8, 8) and codes.dtype == np.uint16
    assert np.array_equal(codes.astype(np.int64), expected.numpy())
    side = json.loads((tmp_path / "c" / "codes.json").read_text())
    assert side["images"] == [str(f) for f in files] and side["shape"] == [3, 8, 8, 8]
    assert side["tokenizer"] == {"path": str((models / "tok").resolve()), "sha256": tokenizer_fingerprint(models / "tok")}


# ----------------------------------------------------------------------------- unified-model commands


def test_chat_one_shot_and_interactive(models, capsys, monkeypatch):
    pipe = UnifiedPipeline.from_pretrained(models / "unified")
    image = models / "images" / "im1.png"
    want = pipe.answer([Image.open(image)] * 2, [QUESTION, "Describe the image."], max_new_tokens=6)
    rc, out, _ = cli(capsys, "chat", models / "unified", "--image", image, "--question", QUESTION,
                     "--max_new_tokens", "6", "--device", "cpu")
    assert rc == 0 and out == want[0] + "\n"
    # interactive: questions from stdin until 'exit'; blank lines are skipped, nothing after 'exit' is read
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n\nDescribe the image.\nexit\n{QUESTION}\n"))
    rc, out, _ = cli(capsys, "chat", models / "unified", "--image", image, "--max_new_tokens", "6")
    assert rc == 0 and out.splitlines() == want


def test_generate_writes_images_and_a_reproducible_manifest(models, tmp_path, capsys):
    prompts = ["a photo of a red circle", "a photo of two green triangles"]
    sampler = ["--temperature", "0.9", "--top_k", "8", "--cfg_scale", "2"]
    rc, out, _ = cli(capsys, "generate", models / "unified", "--prompt", prompts[0], "--prompt", prompts[1], "--n", "2",
                     "--seed", "5", "--batch", "3", "--out", tmp_path / "gen", *sampler)
    assert rc == 0 and "4 images of 2 prompts" in out
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["sampler"] == {"cfg_scale": 2.0, "temperature": 0.9, "top_k": 8, "top_p": 1.0}  # top_p: default
    assert manifest["tokenizer"]["sha256"] == tokenizer_fingerprint(models / "tok")
    rows = manifest["images"]
    assert [(r["file"], r["prompt"], r["seed"]) for r in rows] == [
        ("0000_000.png", prompts[0], 5), ("0000_001.png", prompts[0], 6),
        ("0001_000.png", prompts[1], 7), ("0001_001.png", prompts[1], 8)]
    imgs = {r["file"]: np.asarray(Image.open(tmp_path / "gen" / r["file"])) for r in rows}
    assert all(a.shape == (64, 64, 3) and a.dtype == np.uint8 for a in imgs.values())

    # an image's recorded seed regenerates it alone (the pixel decode of 1 vs 3 images may round a pixel by 1)
    rc, _, _ = cli(capsys, "generate", models / "unified", "--prompt", prompts[1], "--seed", "8", "--out",
                   tmp_path / "one", *sampler)
    alone = np.asarray(Image.open(tmp_path / "one" / "0000_000.png")).astype(int)
    diff = np.abs(alone - imgs["0001_001.png"].astype(int))
    assert rc == 0 and diff.max() <= 1 and (diff > 0).mean() < 0.01
    pipe = UnifiedPipeline.from_pretrained(models / "unified")
    direct = pipe.generate_image([prompts[1]], seeds=[8], cfg_scale=2.0, temperature=0.9, top_k=8)[0]
    assert np.array_equal(direct, alone)


# ----------------------------------------------------------------------------- info


def test_info_reports_config_parameters_sizes_and_tokenizer(models, capsys):
    rc, out, _ = cli(capsys, "info", models / "tok", "--json")
    info = json.loads(out)
    tok = EvoTokenizer.from_pretrained(models / "tok", with_teacher=False)
    assert rc == 0 and info["kind"] == "tokenizer export" and info["sha256"] == tokenizer_fingerprint(models / "tok")
    assert info["config"]["grid"] == 8 and info["config"]["depth_sem"] == 8 and info["config"]["codebook_size"] == 64
    assert info["parameters"]["total"] == sum(v.numel() for v in tok.state_dict().values())
    assert info["parameters"]["pixel_decoder"] == sum(p.numel() for p in tok.pixel_decoder.parameters())
    assert info["disk"]["total_bytes"] == sum(p.stat().st_size for p in (models / "tok").iterdir())

    rc, out, _ = cli(capsys, "info", models / "unified", "--json")
    info = json.loads(out)
    pipe = UnifiedPipeline.from_pretrained(models / "unified")
    assert rc == 0 and info["kind"] == "unified export"
    assert info["tokenizer"] == {"path": str((models / "tok").resolve()), "sha256": tokenizer_fingerprint(models / "tok"),
                                 "found": True, "matches": True}
    p = info["parameters"]
    assert p["llm"] == sum(x.numel() for x in pipe.model.llm.parameters())  # tied embeddings once
    assert p["depth"] == sum(x.numel() for x in pipe.model.depth.parameters()) and p["codebooks"] == 4 * 64 * 32
    assert info["config"]["sampler"]["cfg_scale"] == 3.0 and info["config"]["llm"]["vocab_size"] > 0
    assert set(info["disk"]["entries"]) == {"heads.safetensors", "llm", "text_tokenizer", "unified_config.json"}

    rc, out, _ = cli(capsys, "info", models / "tok")  # human-readable
    assert rc == 0 and "kind: tokenizer export" in out and "total: " in out and "M)" in out


# ----------------------------------------------------------------------------- errors


def _error_cases(m: Path, tmp: Path) -> list[tuple[list, Path]]:
    img = m / "images" / "im0.png"
    save_tiny_tokenizer(tmp / "tok2", seed=1)  # another tokenizer: the sha256 check refuses it
    (tmp / "empty").mkdir()
    (tmp / "bad.png").write_bytes(b"not an image")
    return [
        (["chat", m / "tok", "--image", img, "--question", "q"], m / "tok"),  # tokenizer export passed to chat
        (["generate", m / "tok", "--prompt", "p", "--out", tmp / "g"], m / "tok"),
        (["chat", tmp / "missing", "--image", img, "--question", "q"], tmp / "missing"),
        (["chat", m / "unified", "--image", tmp / "nope.png", "--question", "q"], tmp / "nope.png"),
        (["chat", m / "unified", "--image", img, "--tokenizer", tmp / "empty", "--question", "q"], tmp / "empty"),
        (["generate", m / "unified", "--prompt", "p", "--out", tmp / "g", "--tokenizer", tmp / "tok2"], tmp / "tok2"),
        (["encode", "--tokenizer", m / "unified" / "llm", img, "--out", tmp / "c.npy"], m / "unified" / "llm"),
        (["encode", "--tokenizer", m / "tok", tmp / "bad.png", "--out", tmp / "c.npy"], tmp / "bad.png"),
        (["encode", "--tokenizer", m / "tok", img, "--out", tmp / "c.txt"], tmp / "c.txt"),
        (["reconstruct", "--tokenizer", tmp / "empty", img, "--out", tmp / "r"], tmp / "empty"),
        (["reconstruct", "--tokenizer", m / "tok", tmp / "missing.png", "--out", tmp / "r"], tmp / "missing.png"),
        (["export", m / "unified", "--out", tmp / "e"], m / "unified"),  # an export is not a training checkpoint
        (["export", m / "tok", "--out", tmp / "e"], m / "tok"),
        (["info", tmp / "empty"], tmp / "empty"),
        (["info", img], img),
    ]


def test_errors_exit_2_with_one_line_naming_the_path(models, tmp_path, capsys):
    for argv, path in _error_cases(models, tmp_path):
        rc, out, err = cli(capsys, *argv)
        assert rc == 2, argv
        assert len(err.strip().splitlines()) == 1 and str(path) in err and "Traceback" not in err, (argv, err)
        assert err.startswith(f"unimllm {argv[0]}: error: "), err
    assert cli(capsys, "info", tmp_path / "tok2")[0] == 0  # the other tokenizer itself is fine
    with pytest.raises(SystemExit) as e:  # argparse: bad values are usage errors, status 2 as well
        main(["generate", str(models / "unified"), "--prompt", "p", "--out", str(tmp_path / "g"), "--n", "0"])
    assert e.value.code == 2 and "--n: must be >= 1" in capsys.readouterr().err


def test_installed_console_script(models, tmp_path):
    script = shutil.which("unimllm", path=str(Path(sys.executable).parent))
    assert script, "the unimllm console script is missing: pip install -e . (make install)"
    res = subprocess.run([script, "info", str(models / "unified"), "--json"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["kind"] == "unified export"
    res = subprocess.run([script, "chat", str(models / "tok"), "--image", str(models / "images" / "im0.png"),
                          "--question", "q"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"unimllm chat: error: {models / 'tok'}: is a stage-1 "
                                                          "tokenizer export")


# ----------------------------------------------------------------------------- export of training checkpoints


def stage1_args(world: Path, out: Path, steps: int) -> list[str]:
    return ["--config", str(ROOT / "launch/configs/stage1/tiny.yaml"), *STAGE1_SMALL, "--train.threads", "1",
            "--data.sources.0.shards", str(world / "shapes/train/shapes-train-{000000..000002}.tar"),
            "--val.shards", "", "--train.steps", str(steps), "--run.out_dir", str(out)]


def test_export_of_training_checkpoints_equals_the_trainers_export(stage2_world, tmp_path, capsys):
    import deepspeed

    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    stage1.main(stage1_args(stage2_world, run1, 2))
    stage2.main(stage2_args(stage2_world, run2, 2, "--val.shards", "", "--val.geneval_prompts", ""))

    ckpt1 = run1 / "checkpoints" / "step_00000002"
    rc, out, _ = cli(capsys, "export", ckpt1, "--out", tmp_path / "tok")
    assert rc == 0 and "exported the tokenizer" in out
    assert_same_export(tmp_path / "tok", run1 / "export" / "tokenizer")
    tok = EvoTokenizer.from_pretrained(tmp_path / "tok", with_teacher=False)
    assert tok.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 8, 8, 4)  # STAGE1_SMALL: L_sem 4

    rc, out, _ = cli(capsys, "export", run2, "--out", tmp_path / "uni")  # a run directory: its latest checkpoint
    assert rc == 0 and "exported the unified" in out
    assert_same_export(tmp_path / "uni", run2 / "export" / "unified")
    pipe = UnifiedPipeline.from_pretrained(tmp_path / "uni")
    assert pipe.generate_image(["a photo of a red circle"], seed=0)[0].shape == (64, 64, 3)

    rc, _, err = cli(capsys, "export", run2, "--out", tmp_path / "uni")
    assert rc == 2 and f"{tmp_path / 'uni'}: already exists" in err
    assert cli(capsys, "export", run2, "--out", tmp_path / "uni", "--overwrite")[0] == 0
    save_tiny_tokenizer(tmp_path / "other", seed=1)
    rc, _, err = cli(capsys, "export", run2, "--out", tmp_path / "x", "--tokenizer", tmp_path / "other")
    assert rc == 2 and "codebooks differ" in err and str(tmp_path / "other") in err and not (tmp_path / "x").exists()
    cut = tmp_path / "cut"  # a truncated weights file: said so, not advised to unpickle it
    shutil.copytree(run1, cut)
    states = cut / "checkpoints" / "step_00000002" / "tokenizer" / "state" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    rc, _, err = cli(capsys, "export", cut, "--out", tmp_path / "y")
    assert rc == 2 and f"{states}: cannot be loaded: truncated, corrupt" in err and "--allow_pickle" not in err
    with pytest.raises(CheckpointError, match="cannot be loaded: truncated, corrupt"):  # and resuming from it
        stage1.main(stage1_args(stage2_world, cut, 3))

    rc, out, _ = cli(capsys, "info", run2, "--json")
    info = json.loads(out)
    assert rc == 0 and info["kind"] == "run" and info["checkpoints"] == [2] and "unified" in info["exports"]
    ck = info["latest_checkpoint"]
    assert ck["exports_to"] == "unified" and ck["training"]["step"] == 2 and ck["training"]["stage"] == "Stage2Task"
    assert ck["training"]["deepspeed"] == deepspeed.__version__ and ck["training"]["zero_stage"] == 0
    assert ck["training"]["data"][0]["codes_tokenizer_sha256"] == tokenizer_fingerprint(stage2_world / "tok")
    assert ck["tokenizer"]["sha256_now"] == tokenizer_fingerprint(stage2_world / "tok")
    exported = json.loads(cli(capsys, "info", tmp_path / "uni", "--json")[1])
    assert ck["parameters"]["total"] == exported["parameters"]["total"]
    assert exported["provenance"] is None  # not inside a run's export/
    ck1 = json.loads(cli(capsys, "info", ckpt1, "--json")[1])
    assert ck1["exports_to"] == "tokenizer" and ck1["config"]["depth_sem"] == 4
    assert ck1["parameters"]["total"] == json.loads(cli(capsys, "info", tmp_path / "tok", "--json")[1])["parameters"]["total"]


def test_export_of_a_stage3_lora_checkpoint_merges_the_adapters(stage2_world, tmp_path, capsys):
    """Stage 3 (LoRA) from a tiny stage-2 export: the CLI export merges the adapters as stage 3's export does."""
    stage3 = pytest.importorskip("stage3")  # launch/stage3.py
    tok = EvoTokenizer.from_pretrained(stage2_world / "tok", with_teacher=False)
    save_tiny_unified(tmp_path / "stage2", tok, stage2_world / "tok")
    run = tmp_path / "run"
    stage3.main(["--config", str(ROOT / "launch/configs/stage3/tiny.yaml"), "--init_from", str(tmp_path / "stage2"),
                 "--data.sources.0.shards", str(stage2_world / "codes/shapes-train-{000000..000002}.tar"),
                 "--data.batch_size", "4", "--val.shards", "", "--val.geneval_prompts", "", "--train.threads", "1",
                 "--tune.method", "lora", "--tune.lora.rank", "4", "--tune.lora.target_modules", "q_proj,v_proj",
                 "--train.steps", "2", "--run.out_dir", str(run), "--run.wandb_mode", "disabled"])
    rc, out, _ = cli(capsys, "export", run, "--out", tmp_path / "uni")
    assert rc == 0 and "exported the unified" in out
    assert_same_export(tmp_path / "uni", run / "export" / "unified")
    info = json.loads(cli(capsys, "info", run / "checkpoints" / "step_00000002", "--json")[1])
    assert info["training"]["stage"] == "Stage3Task" and info["training"]["init_from"] == str(tmp_path / "stage2")
    assert info["tokenizer"]["sha256"] == tokenizer_fingerprint(stage2_world / "tok") and info["tokenizer"]["matches"]


ZERO3 = """
import sys
from pathlib import Path
import torch
from conftest import save_tiny_tokenizer
from unimllm.checkpoint import Checkpointer
from unimllm.config import to_dict
from unimllm.distributed import build_engine, deepspeed_config, gathered_parameters, init_distributed

run = Path(sys.argv[1])
dist = init_distributed("cpu")
model = save_tiny_tokenizer(run.parent / "init").train()
opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
engine = build_engine(model, opt, deepspeed_config(micro_batch=2, grad_accum=1, zero_stage=3, precision="fp32",
                                                   grad_clip=1.0))
meta = {"stage": "Stage1Task", "config": {"train": {"zero_stage": 3}}, "model_config": to_dict(model.cfg)}
Checkpointer(run / "checkpoints", dist).save(1, {"tokenizer": engine}, meta, {})
with gathered_parameters(model, 3):
    model.save_pretrained(run / "export" / "tokenizer")
"""


@pytest.mark.slow
def test_export_of_a_zero3_checkpoint_needs_allow_pickle(tmp_path, capsys):
    """A real DeepSpeed ZeRO-3 checkpoint (the trainer's Checkpointer on a ZeRO-3 engine, in a fresh process that
    may first build DeepSpeed's CPU communication op)."""
    run = tmp_path / "run"
    dist_vars = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")  # in-process runs set them
    env = {**{k: v for k, v in os.environ.items() if k not in dist_vars},
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "DS_ACCELERATOR": "cpu"}
    res = subprocess.run([sys.executable, "-c", ZERO3, str(run)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    states = run / "checkpoints" / "step_00000001" / "tokenizer" / "state"
    assert (states / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()

    rc, _, err = cli(capsys, "export", run, "--out", tmp_path / "tok")
    assert rc == 2 and "ZeRO-3" in err and "--allow_pickle" in err and str(states) in err
    assert not (tmp_path / "tok").exists()
    rc, out, _ = cli(capsys, "export", run, "--out", tmp_path / "tok", "--allow_pickle")
    assert rc == 0 and "Processing zero checkpoint" not in out  # DeepSpeed's report goes to stderr
    assert_same_export(tmp_path / "tok", run / "export" / "tokenizer")

    info = json.loads(cli(capsys, "info", run / "checkpoints" / "step_00000001", "--json")[1])  # no unpickling
    assert info["training"]["zero_stage"] == 3
    assert info["parameters"]["total"] == json.loads(cli(capsys, "info", tmp_path / "tok", "--json")[1])["parameters"]["total"]


def test_plan_prints_every_cost_with_its_source(capsys, tmp_path):
    bench = {"machine": "test CPU", "side": 256, "results": {"keep": {"build_1w": 1000.0},
                                                              "reencode": {"build_1w": 250.0}}}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    rc, out, _ = cli(capsys, "plan", "--images", "3600000", "--build_results", tmp_path / "b.json", "--json")
    rows = {r["item"]: r for r in json.loads(out)["rows"]}
    assert rc == 0 and rows["shards"]["value"].startswith("360 of 10,000")
    assert rows["CPU-hours: build shards (as stored)"]["value"] == "1.0"  # 3.6M images at 1000/s on one core
    assert rows["CPU-hours: build shards (resized + re-encoded)"]["source"].startswith("measured: 250 img/s")
    assert all(r["source"].startswith("estimate") for k, r in rows.items() if k.startswith("GPU-hours"))
    twice = json.loads(cli(capsys, "plan", "--images", "7200000", "--build_results", tmp_path / "b.json",
                           "--json")[1])["rows"]
    stage2 = [float(r["value"].replace(",", "")) for r in (*json.loads(out)["rows"], *twice) if "stage 2" in r["item"]]
    assert stage2[1] == pytest.approx(2 * stage2[0], rel=0.01)  # linear in the image count
    rc, out, _ = cli(capsys, "plan", "--build_results", tmp_path / "none.json")
    assert rc == 0 and "no measurement at" in out and "run benchmarks/build_shards.py" in out
    rc, _, err = cli(capsys, "plan", "--resolution", "64")
    assert rc == 2 and "--resolution 64" in err
