"""Stage 0 of ``make demo``: train the shapes world's semantic teacher (:class:`tokenizer.teacher.ShapesTeacher`).

The teacher is supervised per 8x8 cell on what the world knows at render time (``data.shapes_geometry.patch_labels``):
the shape and colour of the object covering the cell (or background) and where its centre is. Its export
(``<run>/export/teacher``) is what stage 1's ``model.teacher.pretrained`` loads. Entry point:
``launch/teacher.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.config import DataConfig
from data.loader import StreamingLoader, eval_loader
from data.shapes_geometry import PATCH_COLORS, PATCH_SHAPES, patch_labels
from data.transforms import normalize
from tokenizer.config import VisionTowerConfig
from tokenizer.teacher import ShapesTeacher, teacher_losses
from unimllm.config import ConfigError
from unimllm.distributed import DistInfo, all_reduce_sums, gathered_parameters
from unimllm.trainer import OptimConfig, RunConfig, Task, TrainConfig


@dataclass
class TeacherLossConfig:
    """Weights of the per-cell objectives (cross-entropy for classes, MSE for the centre)."""

    shape_weight: float = 1.0
    """Cell shape (background, circle, square, triangle)."""
    color_weight: float = 1.0
    """Cell colour (background or one of GenEval's ten)."""
    center_weight: float = 4.0
    """Centre (x, y) of the cell's object as a fraction of the side (object cells only)."""
    min_cover: float = 0.2
    """A cell belongs to the object covering most of it if that covers at least this fraction of the cell."""


@dataclass
class TeacherValConfig:
    """Held-out per-cell accuracy."""

    shards: str = ""
    """Held-out shapes-world shards (brace pattern); empty = no validation."""
    max_images: int = 256
    """Images evaluated (over all ranks)."""
    batch_size: int = 64
    """Validation batch per rank."""


@dataclass
class TeacherStageConfig:
    """Train the shapes-world semantic teacher (``launch/teacher.py``)."""

    model: VisionTowerConfig = field(default_factory=lambda: VisionTowerConfig(
        hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, feature_layer=-1))
    """The tower (random init; its ``feature_layer`` hidden states are the features the heads read)."""
    loss: TeacherLossConfig = field(default_factory=TeacherLossConfig)
    """The objective."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.0))
    """AdamW."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shapes-world shards, read with their json (the records' ``objects``), no flips, centre crop."""
    val: TeacherValConfig = field(default_factory=TeacherValConfig)
    """Held-out validation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output directory and logging."""

    def validate(self) -> None:
        img = self.data.image
        if img.resolution != self.model.image_size:
            raise ConfigError("data.image.resolution", f"{img.resolution} != model.image_size {self.model.image_size}")
        if img.flip or img.crop != "center":
            raise ConfigError("data.image", "the per-cell labels come from the record's boxes: flip false, crop center")
        if not self.data.read_json:
            raise ConfigError("data.read_json", "the labels come from each sample's json: must be true")
        if not self.data.sources:
            raise ConfigError("data.sources", "no training shards configured")


def batch_labels(records: list[dict], image_size: int, grid: int, min_cover: float,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Per-cell labels of a batch of shapes-world records: shape/color (B, g, g) long, center (B, g, g, 2)."""
    missing = [r.get("__key__", i) for i, r in enumerate(records) if "objects" not in r]
    if missing:
        raise ValueError(f"samples {missing[:4]} have no 'objects' in their json: the teacher trains on shapes-world shards")
    per = [patch_labels(r["objects"], image_size, grid, min_cover) for r in records]
    return {k: torch.from_numpy(np.stack([p[k] for p in per])).to(device) for k in ("shape", "color", "center")}


class TeacherTask(Task):
    """Supervised per-cell training of :class:`ShapesTeacher`; exports the teacher directory."""

    def __init__(self, cfg: TeacherStageConfig):
        self.cfg = cfg

    def setup(self, dist: DistInfo) -> None:
        self.dist, self.device = dist, dist.device
        self.model = ShapesTeacher(self.cfg.model, len(PATCH_SHAPES), len(PATCH_COLORS)).to(self.device)
        self.loader = StreamingLoader(self.cfg.data, rank=dist.rank, world_size=dist.world_size)
        self.grid = self.model.tower.grid_size

    def optimizers(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return {"teacher": (self.model, self.cfg.optim.build(params, self.device))}

    def micro_batch_size(self) -> int:
        return self.cfg.data.batch_size

    def train_batches(self):
        return self.loader.batches()

    def _labels(self, records: list[dict]) -> dict[str, torch.Tensor]:
        return batch_labels(records, self.cfg.model.image_size, self.grid, self.cfg.loss.min_cover, self.device)

    def micro_step(self, engines: dict[str, Any], batch: Any, step: int) -> dict[str, float]:
        engine, L = engines["teacher"], self.cfg.loss
        x = normalize(batch["image"].to(self.device))  # (B, 3, H, W) in [-1, 1]
        labels = self._labels(batch["json"])
        with self.forward_context():
            parts = teacher_losses(engine(x), labels)
            loss = (L.shape_weight * parts["shape_loss"] + L.color_weight * parts["color_loss"]
                    + L.center_weight * parts["center_loss"])
        engine.backward(loss)
        engine.step()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}

    def count(self, batch: Any) -> dict[str, int]:
        return {"images": len(batch["__key__"])}

    def data_stats(self) -> dict[str, float]:
        return {f"data/skipped/{k}": float(v) for k, v in self.loader.skip_counts().items()}

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "loader" in state:
            self.loader.load_state_dict(state["loader"])

    @torch.no_grad()
    def evaluate(self, engines: dict[str, Any], step: int) -> dict[str, float]:
        v = self.cfg.val
        if not v.shards:
            return {}
        self.model.eval()
        per_rank = max(1, v.max_images // self.dist.world_size)
        sums = {"n": 0.0, "cells": 0.0, "shape": 0.0, "color": 0.0, "center_err": 0.0}
        for batch in eval_loader(v.shards, v.batch_size, self.cfg.data.image.resolution, rank=self.dist.rank,
                                 world_size=self.dist.world_size):
            keep = int(per_rank - sums["n"])
            x = normalize(batch["image"][:keep].to(self.device))
            labels = self._labels(batch["json"][:keep])
            out, obj = self.model(x), labels["shape"] > 0
            sums["n"] += len(x)
            sums["cells"] += float(obj.sum())
            sums["shape"] += float((out["shape"].argmax(-1) == labels["shape"])[obj].sum())
            sums["color"] += float((out["color"].argmax(-1) == labels["color"])[obj].sum())
            sums["center_err"] += float((out["center"][obj] - labels["center"][obj]).abs().mean(-1).sum())
            if sums["n"] >= per_rank:
                break
        self.model.train()
        tot = all_reduce_sums(sums)
        cells = max(tot["cells"], 1.0)
        return {"val/shape_acc": tot["shape"] / cells, "val/color_acc": tot["color"] / cells,
                "val/center_err": tot["center_err"] / cells, "val/images": tot["n"]}

    def export(self, engines: dict[str, Any], out_dir: Path) -> None:
        with gathered_parameters(self.model, self.cfg.train.zero_stage):
            if self.dist.is_main:
                self.model.save_pretrained(out_dir / "teacher")
