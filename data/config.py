"""Data config sections shared by every stage (``data:`` in a stage YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unimllm.config import ConfigError


@dataclass
class SourceConfig:
    """One shard source; several are mixed by weight."""

    shards: str = ""
    """Shard paths: brace patterns such as 'shards/train-{000000..000009}.tar', several joined by '::'."""
    weight: float = 1.0
    """Resampled: sampling probability proportional to weight. Epoch mode: a whole-number repeat
    factor (each sample of this source appears `weight` times per epoch)."""
    name: str = ""
    """Name for logs (default: 'source<i>')."""


@dataclass
class ImageConfig:
    """Image decoding and augmentation (no torchvision: PIL + numpy + torch)."""

    resolution: int = 64
    """Output side length in pixels (square)."""
    crop: Literal["center", "random"] = "center"
    """'center': ADM center crop (evaluation); 'random': ADM random crop (short side resized to a random
    size in [resolution, resolution / min_crop_frac], then a random square crop)."""
    min_crop_frac: float = 0.8
    """Random crop only: the smallest crop as a fraction of the resized short side (ADM uses 0.8)."""
    flip: bool = False
    """Random horizontal flip with probability 0.5."""

    def validate(self) -> None:
        if self.resolution <= 0:
            raise ConfigError("resolution", f"must be > 0, got {self.resolution}")
        if not 0.0 < self.min_crop_frac <= 1.0:
            raise ConfigError("min_crop_frac", f"must be in (0, 1], got {self.min_crop_frac}")


@dataclass
class DataConfig:
    """A streaming loader over WebDataset shards (see docs/data.md)."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Shard sources to mix."""
    resampled: bool = False
    """True: an endless stream, shards drawn with replacement (sources by weight). False: epochs in which
    every sample is seen exactly once (times its source's repeat factor) across all ranks and workers."""
    batch_size: int = 8
    """Samples per batch on each rank (the micro batch)."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = load in the main process)."""
    prefetch_factor: int = 2
    """Batches prefetched per worker."""
    shuffle_buffer: int = 256
    """Per-worker shuffle buffer in samples (0 = keep shard order)."""
    seed: int = 0
    """Base seed; shard order uses (seed, epoch), the buffer (seed, epoch, rank, worker)."""
    drop_last: bool = False
    """Drop each worker's last partial batch of an epoch."""
    read_json: bool = True
    """Parse and schema-check each sample's json and return it as batch['json']. False: images (and
    codes) only, e.g. for tokenizer training; then json problems are not checked or counted."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """Image decoding/augmentation."""

    def validate(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError("batch_size", f"must be > 0, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.prefetch_factor <= 0:
            raise ConfigError("prefetch_factor", f"must be > 0, got {self.prefetch_factor}")
        if self.shuffle_buffer < 0:
            raise ConfigError("shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        for i, src in enumerate(self.sources):
            if not src.shards:
                raise ConfigError(f"sources.{i}.shards", "is empty")
            if src.weight <= 0:
                raise ConfigError(f"sources.{i}.weight", f"must be > 0, got {src.weight}")
            if not self.resampled and not float(src.weight).is_integer():
                raise ConfigError(
                    f"sources.{i}.weight",
                    f"epoch mode (resampled: false) needs a whole-number repeat factor, got {src.weight}",
                )
