"""A semantic teacher for the shapes world: the role SigLIP2 plays in the EvoTok recipe, trained in a minute.

EvoTok's semantic decoder regresses a frozen SigLIP2 encoder's patch features; what makes them worth
regressing is that they encode the objects in each patch. No pretrained weights exist for the 64-px shapes
world (and none are downloaded), so ``make demo`` trains a small SigLIP-architecture vision tower (this model, trained by
:mod:`unimllm.stages.teacher_stage` through the shared trainer), supervised on what the world knows at render time (``data.shapes_geometry.patch_labels``): for every
8x8 cell, the shape and colour of the object covering it (or background) and where that object's centre is.

    images (B, 3, H, W) in [-1, 1] -> SiglipVisionModel (all layers) -> features (B, h, w, C)
        -> linear heads: shape (B, h, w, 4), colour (B, h, w, 11), object centre (B, h, w, 2)

Linear heads on the features force the features themselves to carry each cell's object linearly. The export
(``<run>/export/teacher``) is a Hugging Face model directory (``config.json`` + ``model.safetensors``, written by
``save_pretrained``) that ``model.teacher.pretrained`` of stage 1 loads like any SigLIP teacher, with
``model.teacher.feature_layer: -1``; the heads go beside it in ``heads.safetensors`` (for probes, not read by
stage 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.config import VisionTowerConfig
from tokenizer.encoder import VisionTower
from unimllm.files import atomic_path

HEADS_NAME = "heads.safetensors"


class ShapesTeacher(nn.Module):
    """A vision tower plus per-cell linear heads (shape, colour, object centre)."""

    def __init__(self, cfg: VisionTowerConfig, n_shapes: int, n_colors: int, config_key: str = "model"):
        super().__init__()
        self.tower = VisionTower(cfg, config_key=config_key)
        C = self.tower.hidden_size
        self.shape_head = nn.Linear(C, n_shapes)  # classes incl. background
        self.color_head = nn.Linear(C, n_colors)
        self.center_head = nn.Linear(C, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> features (B, h, w, C) and each head's output."""
        f = self.tower(images)  # (B, h, w, C)
        return {"features": f, "shape": self.shape_head(f), "color": self.color_head(f),
                "center": self.center_head(f)}

    def heads_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("tower.")}

    def save_pretrained(self, directory: str | Path) -> Path:
        """The tower as a Hugging Face directory (what ``model.teacher.pretrained`` loads) + the heads."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tower.model.save_pretrained(str(out), safe_serialization=True)
        with atomic_path(out / HEADS_NAME) as tmp:
            save_file(self.heads_state(), str(tmp),
                      metadata={"format": "pt", "feature_layer": str(self.tower.cfg.feature_layer)})
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, feature_layer: int = -1) -> ShapesTeacher:
        """Reload a :meth:`save_pretrained` directory (safetensors only), in eval mode."""
        from safetensors.torch import load_file

        src = Path(directory)
        heads = src / HEADS_NAME
        if not heads.is_file():
            raise FileNotFoundError(f"{heads} not found (expected a ShapesTeacher.save_pretrained directory)")
        state = load_file(str(heads))
        model = cls(VisionTowerConfig(pretrained=str(src), feature_layer=feature_layer),
                    n_shapes=state["shape_head.weight"].shape[0], n_colors=state["color_head.weight"].shape[0],
                    config_key="teacher")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("tower.") for k in missing):
            raise ValueError(f"{heads}: unexpected keys {unexpected[:8]}, missing {[k for k in missing if not k.startswith('tower.')]}")
        return model.eval()


def teacher_losses(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head losses and accuracies (accuracies over object cells, where the background is no shortcut)."""
    obj = labels["shape"] > 0  # (B, g, g)
    res = {"shape_loss": F.cross_entropy(out["shape"].flatten(0, 2), labels["shape"].flatten()),
           "color_loss": F.cross_entropy(out["color"].flatten(0, 2), labels["color"].flatten())}
    res["center_loss"] = F.mse_loss(out["center"][obj], labels["center"][obj]) if obj.any() else out["center"].sum() * 0
    with torch.no_grad():
        res["shape_acc"] = (out["shape"].argmax(-1) == labels["shape"])[obj].float().mean()
        res["color_acc"] = (out["color"].argmax(-1) == labels["color"])[obj].float().mean()
        res["center_err"] = (out["center"][obj] - labels["center"][obj]).abs().mean()
    return res
