"""Metrics logging behind one small interface: JSONL always, W&B optional, console; rank 0 only.

``build_logger(...)`` returns a :class:`MultiLogger` on rank 0 and a :class:`NullLogger` elsewhere, so
callers never check ranks. Keys are namespaced (``train/loss``, ``data/skipped/bad_image``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from unimllm.files import atomic_write

_PROGRESS = {"enabled": True}


def set_progress(enabled: bool) -> None:
    """Turn every progress bar of this process on or off (``--no_progress`` of every command)."""
    _PROGRESS["enabled"] = enabled


def progress_bar(iterable: Any = None, *, desc: str, total: int | None = None, initial: int = 0, unit: str = "it",
                 main: bool = True, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr for a loop that can take more than a few seconds. Shown only on rank 0 (``main``),
    when stderr is a terminal, and unless turned off (``enabled=False``, :func:`set_progress`)."""
    show = enabled and main and _PROGRESS["enabled"] and sys.stderr.isatty()
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not show)


class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, key: str, image: Image.Image, step: int) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    """The no-op twin (non-zero ranks, tests)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _clean(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _row_step(line: str) -> int:
    """The step of one metrics.jsonl row (a torn last line from a kill counts as after every checkpoint)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize


class JsonlLogger:
    """One JSON object per ``log`` call in ``<dir>/metrics.jsonl``; images as PNG under ``<dir>/images``."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if resume_step is not None and path.is_file():  # rows logged after the checkpoint are logged again
            keep = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and _row_step(line) <= resume_step]
            atomic_write(path, "".join(keep))
        self.f = open(path, "a", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.f.write(json.dumps({"step": step, "time": round(time.time(), 3),
                                 **{k: _clean(v) for k, v in metrics.items()}}) + "\n")

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        path = self.dir / "images" / f"{key.replace('/', '_')}_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)

    def close(self) -> None:
        self.f.close()


class WandbLogger:
    """Weights & Biases (``mode``: online / offline / disabled; WANDB_MODE in the environment wins)."""

    def __init__(self, run_dir: str | Path, project: str, name: str, config: dict, mode: str):
        import wandb

        self.wandb = wandb
        id_file = Path(run_dir) / "wandb_run_id"  # one W&B run per run directory: a resumed run continues it
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, id=run_id,
                              mode=os.environ.get("WANDB_MODE", mode), resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({k: _clean(v) for k, v in metrics.items()}, step=step)

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        self.run.log({key: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class ConsoleLogger:
    """A compact line per ``log`` call on stderr (the trainer's tqdm bar shows progress)."""

    def __init__(self, keys: tuple[str, ...] = ()):
        self.keys = keys

    def log(self, metrics: dict[str, float], step: int) -> None:
        shown = {k: v for k, v in metrics.items() if not self.keys or any(k.startswith(p) for p in self.keys)}
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
        print(f"step {step}: " + " ".join(parts), file=sys.stderr, flush=True)

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class MultiLogger:
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        for lg in self.loggers:
            lg.log_image(key, image, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def build_logger(run_dir: str | Path, *, is_main: bool, wandb_mode: str, project: str, name: str,
                 config: dict, console_keys: tuple[str, ...] = (), resume_step: int | None = None) -> Logger:
    """JSONL + console (+ W&B unless disabled) on rank 0; a NullLogger elsewhere. ``resume_step``: the run
    resumes from that step's checkpoint (metrics.jsonl drops its later rows, so no step is logged twice)."""
    if not is_main:
        return NullLogger()
    loggers: list[Logger] = [JsonlLogger(run_dir, resume_step), ConsoleLogger(console_keys)]
    if os.environ.get("WANDB_MODE", wandb_mode) != "disabled":
        loggers.append(WandbLogger(run_dir, project, name, config, wandb_mode))
    return MultiLogger(loggers)


def print0(*args: Any, is_main: bool = True) -> None:
    if is_main:
        print(*args, file=sys.stderr, flush=True)
