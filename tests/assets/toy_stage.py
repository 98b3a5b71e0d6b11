"""A toy stage for testing the shared trainer: a small conv net regresses each image's mean colour.

Real pieces only: shards read by the streaming loader (random crops + flips: position-seeded RNG),
dropout (torch RNG), DeepSpeed engines, checkpoints. Run in-process (``main([...])``) or as
``deepspeed --num_accelerators 2 tests/assets/toy_stage.py --run.out_dir ... --data.sources.0.shards ...``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from data.config import DataConfig, ImageConfig, SourceConfig
from data.loader import StreamingLoader
from data.transforms import normalize
from unimllm.command_line import parse_cli
from unimllm.distributed import DistInfo, init_distributed
from unimllm.errors import user_errors
from unimllm.trainer import RunConfig, Task, TrainConfig, Trainer


@dataclass
class ToyConfig:
    run: RunConfig = field(default_factory=RunConfig)
    "Run directory and logging."
    train: TrainConfig = field(default_factory=TrainConfig)
    "Loop knobs."
    data: DataConfig = field(default_factory=lambda: DataConfig(
        sources=[SourceConfig(shards="")], batch_size=4, num_workers=1, shuffle_buffer=16, read_json=False,
        image=ImageConfig(resolution=16, crop="random", flip=True)))
    "Training shards."
    lr: float = 1e-2
    "Adam learning rate."


class ToyTask(Task):
    def __init__(self, cfg: ToyConfig):
        self.cfg = cfg

    def setup(self, dist: DistInfo) -> None:
        self.dist = dist
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr)
        self.loader = StreamingLoader(self.cfg.data, rank=dist.rank, world_size=dist.world_size)

    def optimizers(self):
        return {"model": (self.model, self.opt)}

    def micro_batch_size(self) -> int:
        return self.cfg.data.batch_size

    def train_batches(self):
        return self.loader.batches()

    def micro_step(self, engines: dict[str, Any], batch: Any, step: int) -> dict[str, float]:
        eng = engines["model"]
        x = normalize(batch["image"])  # (B, 3, R, R)
        loss = (eng(x) - x.mean(dim=(2, 3))).pow(2).mean()
        eng.backward(loss)
        eng.step()
        return {"loss": loss.item()}

    def count(self, batch: Any) -> dict[str, int]:
        return {"images": len(batch["__key__"])}

    def data_stats(self) -> dict[str, float]:
        return {f"data/skipped/{k}": v for k, v in self.loader.skip_counts().items()}

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_cli(ToyConfig, argv)
    dist = init_distributed(cfg.train.device)
    return Trainer(ToyTask(cfg), run=cfg.run, train=cfg.train, dist=dist, config=cfg).fit()


if __name__ == "__main__":
    with user_errors():  # as the launchers
        main(sys.argv[1:])
