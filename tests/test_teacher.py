"""The shapes-world semantic teacher: per-cell labels, save/reload with identical features, loaded by stage 1
as any teacher (model.teacher.pretrained), and stage 1 tiny training with it logs the semantic loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import stage1  # launch/ is on pytest's pythonpath
import teacher
import torch

from data.shapes_cli import DatasetConfig, write_dataset
from data.shapes_geometry import PATCH_COLORS, PATCH_SHAPES, patch_labels
from tokenizer.config import TokenizerConfig, VisionTowerConfig
from tokenizer.model import EvoTokenizer
from tokenizer.teacher import ShapesTeacher

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.hidden_size", "32", "--model.num_layers", "1", "--model.intermediate_size", "64",
        "--data.batch_size", "4", "--val.max_images", "8", "--train.log_every", "1", "--run.wandb_mode", "disabled"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(DatasetConfig(out=str(out), n=32, n_val=8, shard_size=16, workers=0, geneval_per_tag=1),
                  log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    final = teacher.main(["--config", str(ROOT / "launch/configs/teacher/shapes.yaml"), *TINY,
                          "--data.sources.0.shards", str(shapes / "train/shapes-train-{000000..000001}.tar"),
                          "--val.shards", str(shapes / "val/shapes-val-000000.tar"),
                          "--train.steps", "3", "--run.out_dir", str(out)])
    assert 0 <= final["val/shape_acc"] <= 1 and 0 <= final["val/color_acc"] <= 1 and final["val/images"] == 8
    return out


def test_patch_labels_of_a_known_scene():
    objects = [{"shape": "square", "color": "red", "bbox": [8.0, 16.0, 32.0, 40.0], "center": [20.0, 28.0]},
               {"shape": "circle", "color": "blue", "bbox": [40.0, 40.0, 60.0, 60.0], "center": [50.0, 50.0]}]
    lab = patch_labels(objects, 64, 8)
    square = np.zeros((8, 8), bool)
    square[2:5, 1:4] = True  # rows y 16-40, columns x 8-32: exactly 3 x 3 cells
    assert (lab["shape"][square] == PATCH_SHAPES.index("square")).all()
    assert (lab["color"][square] == PATCH_COLORS.index("red")).all()
    assert np.allclose(lab["center"][square], [20 / 64, 28 / 64])
    assert lab["shape"][5, 5] == PATCH_SHAPES.index("circle") and lab["color"][6, 6] == PATCH_COLORS.index("blue")
    assert lab["shape"][0, 0] == 0 and lab["color"][0, 0] == 0 and lab["cover"][0, 0] == 0
    assert lab["cover"][square].min() == pytest.approx(1.0)


def test_teacher_saves_reloads_with_identical_features(tmp_path):
    torch.manual_seed(0)
    model = ShapesTeacher(VisionTowerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                            feature_layer=-1), n_shapes=4, n_colors=11).eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    before = model(x)
    model.save_pretrained(tmp_path / "t")
    assert {p.name for p in (tmp_path / "t").iterdir()} >= {"config.json", "model.safetensors", "heads.safetensors"}
    after = ShapesTeacher.from_pretrained(tmp_path / "t")(x)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_trained_teacher_loads_as_the_stage1_teacher(trained):
    export = trained / "export" / "teacher"
    probe = ShapesTeacher.from_pretrained(export)
    cfg = TokenizerConfig(teacher=VisionTowerConfig(pretrained=str(export), feature_layer=-1))
    tok = EvoTokenizer(cfg)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(tok.teacher_features(x), probe(x)["features"].flatten(1, 2))
    assert tok.teacher.hidden_size == 32 and not any(p.requires_grad for p in tok.teacher.parameters())
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/shape_loss" in r] == [1, 2, 3]


def test_stage1_tiny_trains_with_the_teacher(shapes, trained, tmp_path):
    from test_stage1 import SMALL  # the stage-1 tiny preset shrunk for tests

    small = list(SMALL)
    i = small.index("--model.teacher.pretrained")
    small[i:i + 4] = []  # the trained teacher instead of the random-init one (its size comes from its directory)
    out = tmp_path / "s1"
    final = stage1.main(["--config", str(ROOT / "launch/configs/stage1/tiny.yaml"), *small,
                         "--model.teacher.pretrained", str(trained / "export" / "teacher"),
                         "--data.sources.0.shards", str(shapes / "train/shapes-train-{000000..000001}.tar"),
                         "--val.shards", str(shapes / "val/shapes-val-000000.tar"),
                         "--train.steps", "3", "--run.out_dir", str(out)])
    assert 0 < final["val/psnr"] < 60
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sem = [r["train/loss/semantic"] for r in rows if "train/loss/semantic" in r]
    assert len(sem) == 3 and all(0 < s < 4 for s in sem)  # cosine + chunked cosine, each in [0, 2]
    saved = json.loads((out / "export" / "tokenizer" / "config.json").read_text())
    assert saved["teacher"]["hidden_size"] == 32 and saved["teacher"]["pretrained"] == ""


def test_semantic_refinement_trains_only_the_semantic_decoder(shapes, trained, tmp_path):
    """loss.semantic_refine_steps: the last steps move the semantic decoder and nothing else (encoder, pixel
    decoder and codebooks frozen, no EMA update), at their own decaying learning rate. A 2-step run and a
    4-step run whose last 2 steps refine share their first 2 steps, so their exports differ only there."""
    from safetensors.torch import load_file
    from test_stage1 import SMALL

    small = list(SMALL)
    i = small.index("--model.teacher.pretrained")
    small[i:i + 4] = []
    common = ["--config", str(ROOT / "launch/configs/stage1/tiny.yaml"), *small,
              "--model.teacher.pretrained", str(trained / "export" / "teacher"), "--val.shards", "",
              "--data.sources.0.shards", str(shapes / "train/shapes-train-{000000..000001}.tar"),
              "--train.schedule.decay_steps", "2"]
    stage1.main([*common, "--train.steps", "2", "--run.out_dir", str(tmp_path / "a")])
    stage1.main([*common, "--train.steps", "4", "--loss.semantic_refine_steps", "2", "--run.out_dir", str(tmp_path / "b")])
    a, b = (load_file(str(tmp_path / r / "export" / "tokenizer" / "model.safetensors")) for r in "ab")
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith("semantic_decoder.") for k in moved), sorted(moved)[:5]
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    refine = {r["step"]: r for r in rows if "train/loss/semantic_refine" in r}
    assert sorted(refine) == [3, 4] and refine[3]["train/semantic_refine_lr"] > refine[4]["train/semantic_refine_lr"]
    assert [r["step"] for r in rows if "train/loss/rec" in r] == [1, 2]
