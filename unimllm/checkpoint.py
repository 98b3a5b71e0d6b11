"""Self-describing, atomic training checkpoints with retention and auto-resume.

Layout of one checkpoint (``<run>/checkpoints/step_00000100/``)::

    meta.json              step, resolved config, model configs, world size, versions, time
    <engine>/state/...     each DeepSpeed engine's save_checkpoint (weights, optimizer, ZeRO partitions)
    rank_00000.pt          per rank: RNG states (torch, numpy, python) and the data-loader state

Everything is written into ``step_XXXXXXXX.tmp/`` and renamed to its final name by rank 0 only after
every rank finished, so a crash mid-save leaves the previous checkpoint as the latest usable one.
``rank_*.pt`` holds only tensors and plain containers and is read with ``weights_only=True``. DeepSpeed's own
loaders call ``torch.load(weights_only=False)``, which would run any code pickled into a tampered checkpoint;
:meth:`Checkpointer.load` runs them inside :func:`weights_only_loads`, so resuming never unpickles code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimllm.distributed import DistInfo, barrier

PREFIX = "step_"
_NAME = re.compile(r"^step_(\d{8})$")
META = "meta.json"
ENGINE_TAG = "state"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first (``.tmp`` ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was saved at (its meta.json)."""
    return int(json.loads((Path(path) / META).read_text())["step"])


def rng_state() -> dict[str, Any]:
    """All RNG states of this process as weights_only-loadable objects."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (incomplete, foreign, or holding pickled code)."""


def _deepspeed_safe_globals() -> list:
    """The few non-container types DeepSpeed writes into its checkpoint files (plain values, no callables)."""
    out: list = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        out += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    return out


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside the block (DeepSpeed's loaders pass ``weights_only=False``) runs with
    ``weights_only=True``: tensors, plain containers and DeepSpeed's value types load; a pickled callable is
    refused with ``pickle.UnpicklingError`` instead of being run."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


UNREADABLE = (RuntimeError, EOFError, OSError)
"""What torch.load raises for a truncated or corrupt file (a zip without its directory, a cut pickle stream);
DeepSpeed's loader also raises RuntimeError for weights that do not fit the model, hence the wording below."""


def unreadable_message(path: str | Path, e: BaseException) -> str:
    """One line for a checkpoint file that cannot be loaded at all (not a pickle refusal)."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return f"{path}: cannot be loaded: truncated, corrupt or not this model's ({type(e).__name__}: {reason})"


class Checkpointer:
    """Save / find / load checkpoints of a set of named DeepSpeed engines plus per-rank state."""

    def __init__(self, root: str | Path, dist_info: DistInfo, keep_last: int = 3):
        self.root = Path(root)
        self.dist = dist_info
        self.keep_last = keep_last

    def save(self, step: int, engines: dict[str, Any], meta: dict, rank_state: dict) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint path."""
        final = self.root / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
            tmp.mkdir(parents=True)
        barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp / name), tag=ENGINE_TAG)
        torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank_{self.dist.rank:05d}.pt")
        barrier()
        if self.dist.is_main:
            meta = {"step": step, "world_size": self.dist.world_size, "time": time.time(),
                    "torch": torch.__version__, **meta}
            with open(tmp / META, "w") as f:
                json.dump(meta, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # re-saving the same step (e.g. final == last periodic)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, path in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str | Path, engines: dict[str, Any]) -> tuple[dict, dict]:
        """Load engines + this rank's state; returns (meta, rank_state). RNG states are restored."""
        path = Path(path)
        meta = json.loads((path / META).read_text())
        if meta.get("world_size") != self.dist.world_size:
            raise CheckpointError(
                f"{path}: saved with world size {meta.get('world_size')}, now {self.dist.world_size}; "
                "exact resume needs the same world size"
            )
        for name, engine in engines.items():
            try:
                with weights_only_loads():
                    load_path, _ = engine.load_checkpoint(str(path / name), tag=ENGINE_TAG)
            except pickle.UnpicklingError as e:
                reason = str(e).strip().splitlines()[0][:200]
                raise CheckpointError(
                    f"{path / name}: refused: a file of this checkpoint holds pickled objects other than tensors "
                    f"and plain values ({reason}); resuming never unpickles code. Resume from another "
                    "checkpoint (train.resume PATH) or start fresh (train.resume: never)") from None
            except UNREADABLE as e:
                raise CheckpointError(f"{unreadable_message(path / name, e)}; resume from another checkpoint "
                                      "(train.resume PATH) or start fresh (train.resume: never)") from None
            if load_path is None:
                raise CheckpointError(f"{path / name}: DeepSpeed found no checkpoint to load")
        try:
            rank_state = torch.load(path / f"rank_{self.dist.rank:05d}.pt", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path / f'rank_{self.dist.rank:05d}.pt'}: refused: not weights-only "
                                  f"({str(e).strip().splitlines()[0][:200]})") from None
        except UNREADABLE as e:
            raise CheckpointError(unreadable_message(path / f"rank_{self.dist.rank:05d}.pt", e)) from None
        set_rng_state(rank_state.pop("rng"))
        return meta, rank_state
