"""Linear probe on ONE grid cell of a tokenizer's semantic features: does that cell say which object it shows?

    python -m unimllm.stages.cell_probe --tokenizer runs/demo/stage1/export/tokenizer \
        --train_shards "runs/demo/shapes/train/shapes-train-000000.tar" \
        --val_shards runs/demo/shapes/val/shapes-val-000000.tar [--out probe.json]

For every shapes-world image, the stage-1 tokenizer's ``semantic_features`` (what the LLM's understanding path
reads: the semantic decoder's output from the codes of all L_sem depths) are taken at each cell that an object
owns (``data.shapes_geometry.patch_labels``). A multinomial logistic regression (one linear layer) is fitted on the cells
of the training images and scored on held-out images, once for the cell's shape and once for its colour.
Reported with the majority-class rate (chance) of the held-out cells; the control is the same probe on a
tokenizer trained without the semantic teacher.
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a command: set the OpenMP wait policy before torch loads (unimllm.runtime)
    from unimllm.runtime import cpu_thread_defaults

    cpu_thread_defaults()

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.loader import eval_loader
from data.shapes_geometry import patch_labels
from data.transforms import normalize
from unimllm.command_line import FlagParser


@torch.no_grad()
def cell_features(tokenizer, shards: str, max_images: int, batch_size: int = 64) -> tuple[torch.Tensor, dict]:
    """Semantic features (n_cells, C) of the object cells of up to ``max_images`` images, and their labels."""
    grid, size = tokenizer.encoder.grid_size, tokenizer.encoder.tower.image_size
    feats, labels, n = [], {"shape": [], "color": []}, 0
    for batch in eval_loader(shards, batch_size, size):
        keep = max_images - n
        x = normalize(batch["image"][:keep])
        f = tokenizer.semantic_features(x).float()  # (B, N, C)
        for i, rec in enumerate(batch["json"][:keep]):
            lab = patch_labels(rec["objects"], size, grid)
            obj = torch.from_numpy(lab["shape"].reshape(-1) > 0)  # (N,)
            feats.append(f[i][obj])
            for k in labels:
                labels[k].append(torch.from_numpy(lab[k].reshape(-1))[obj])
        n += len(x)
        if n >= max_images:
            break
    return torch.cat(feats), {k: torch.cat(v) for k, v in labels.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *, steps: int = 300,
              weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Held-out accuracy of a linear softmax classifier fitted with full-batch L-BFGS on standardised inputs."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x, x_val = (x - mean) / std, (x_val - mean) / std
    classes = int(max(y.max(), y_val.max())) + 1
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(x_val).argmax(-1) == y_val).float().mean())


def probe(tokenizer_dir: str, train_shards: str, val_shards: str, max_train: int = 1000,
          max_val: int = 500) -> dict:
    from tokenizer.model import EvoTokenizer

    tok = EvoTokenizer.from_pretrained(tokenizer_dir, with_teacher=False)
    x, y = cell_features(tok, train_shards, max_train)
    xv, yv = cell_features(tok, val_shards, max_val)
    out = {"tokenizer": str(tokenizer_dir), "train_cells": len(x), "val_cells": len(xv), "feature_dim": x.shape[1]}
    for k in ("shape", "color"):
        out[f"{k}_acc"] = fit_probe(x, y[k], xv, yv[k])
        out[f"{k}_chance"] = float(np.bincount(yv[k].numpy()).max() / len(yv[k]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = FlagParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, nargs="+", help="stage-1 export directories (one probe each)")
    ap.add_argument("--train_shards", required=True, help="shapes-world shards the probe is fitted on (brace pattern)")
    ap.add_argument("--val_shards", required=True, help="held-out shapes-world shards it is scored on")
    ap.add_argument("--max_train", type=int, default=1000, help="training images")
    ap.add_argument("--max_val", type=int, default=500, help="held-out images")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    for d in args.tokenizer:
        if not Path(d).is_dir():
            print(f"--tokenizer: {d} is not a directory", file=sys.stderr)
            return 2
    torch.set_num_threads(1)
    rows = [probe(d, args.train_shards, args.val_shards, args.max_train, args.max_val) for d in args.tokenizer]
    for r in rows:
        print(f"{r['tokenizer']}: shape {r['shape_acc']:.3f} (chance {r['shape_chance']:.3f}), "
              f"colour {r['color_acc']:.3f} (chance {r['color_chance']:.3f}), {r['val_cells']} held-out cells")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
