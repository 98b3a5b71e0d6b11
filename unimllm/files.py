"""Files on disk: atomic writes, loading a weights file safely, and the fingerprint of a safetensors file.

Every file the project writes for a user (configs, manifests, summaries, reports, exports) goes through
:func:`atomic_path` (or its two shortcuts): the content is written under a temporary name in the same folder
and renamed over the target only once complete, so a crash leaves the previous file (or none), never half of
one. Temporary names start with ``.tmp-``: they never match a shard pattern, ``*.png`` layout or
``metrics.jsonl``. Training checkpoints (several ranks write one folder) have their own commit protocol in
:mod:`unimllm.checkpoint`, and shards are streamed into `.tmp` files by :mod:`data.shard_writer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unimllm.config import ConfigError

if TYPE_CHECKING:
    import torch


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write a file or a folder there. On success it replaces ``path``
    (an existing folder is removed first); on an exception the temporary is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    _remove(tmp)  # left by a crash
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """``obj`` as indented JSON (``dumps``: extra ``json.dumps`` arguments) plus a newline, atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, **dumps) + "\n")


def load_state_file(path: str | os.PathLike, field: str) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors`` file or a torch pickle (``weights_only=True``). A nested
    ``state_dict`` / ``model`` entry is unwrapped. Missing file -> ConfigError naming ``field``."""
    import torch

    path = Path(path)
    if not str(path) or not path.is_file():
        raise ConfigError(field, f"{str(path) or '(empty)'} does not exist (a local weights file is required; "
                                 "random_weights=True is for smoke runs only)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ConfigError(field, f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def tensors_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (hex) of the tensors of a ``.safetensors`` file: every tensor's name, dtype, shape and bytes, in
    name order. Equal weights give equal fingerprints whatever the file's header layout (safetensors writes its
    metadata keys in a per-process order, so two exports of the same weights differ in their bytes).
    ValueError naming the file when it is not a safetensors file or is truncated."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
        start = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            entry = header[name]
            begin, end = entry["data_offsets"]
            h.update(json.dumps([name, entry["dtype"], entry["shape"], end - begin]).encode())
            f.seek(start + begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(left, 1 << 24))
                if not chunk:
                    raise ValueError(f"{path}: truncated (tensor {name})")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()
