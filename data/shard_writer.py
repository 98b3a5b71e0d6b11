"""Atomic, deterministic WebDataset tar shard writer.

Each shard is written to ``<name>.tmp`` and renamed into place only when complete, so a crash or a
re-run never leaves a half-written shard under a final name. Members get fixed metadata (mtime 0,
uid/gid 0) so the same samples give byte-identical shards.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

MEMBER_ORDER = ("json",)  # json first, then the other members in sorted order


def _member_bytes(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def sample_members(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """``(member name, bytes)`` for a raw sample, in the writer's fixed order."""
    key = sample["__key__"]
    exts = sorted((e for e in sample if not e.startswith("__")), key=lambda e: (e not in MEMBER_ORDER, e))
    out = []
    for ext in exts:
        data = sample[ext]
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"sample {key!r}: member {ext!r} must be bytes, got {type(data).__name__}")
        out.append((f"{key}.{ext}", bytes(data)))
    return out


class ShardWriter:
    """Write samples into ``pattern % index`` shards, rolling over by sample count and/or bytes.

    ``pattern`` is a printf pattern such as ``out/train-%06d.tar``. ``close()`` (or leaving the
    ``with`` block) finalises the open shard; on an exception the partial ``.tmp`` file is removed.
    """

    def __init__(self, pattern: str | os.PathLike, max_samples: int = 1000, max_bytes: int = 0, start_index: int = 0):
        self.pattern = str(pattern)
        if "%" not in self.pattern:
            raise ValueError(f"shard pattern {self.pattern!r} needs a printf index such as %06d")
        if max_samples <= 0 and max_bytes <= 0:
            raise ValueError("set max_samples and/or max_bytes > 0")
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.index = start_index
        self.written: list[str] = []  # finalised shard paths
        self.total_samples = 0
        self.total_bytes = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0

    # the current shard -------------------------------------------------------------------------
    def _open(self) -> None:
        final = Path(self.pattern % self.index)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = final.with_name(final.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp is not None
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self._tmp.with_name(self._tmp.name[: -len(".tmp")])
        os.replace(self._tmp, final)
        self.written.append(str(final))
        self.total_bytes += final.stat().st_size
        self._tar, self._tmp = None, None
        self.index += 1

    def write(self, sample: dict[str, Any]) -> None:
        members = [_member_bytes(name, data) for name, data in sample_members(sample)]
        # Bytes this sample adds to the tar: header blocks (GNU long-name blocks included) + padded data.
        size = sum(len(info.tobuf(tarfile.GNU_FORMAT)) + (info.size + 511) // 512 * 512 for info, _ in members)
        if self._tar is not None and (
            (self.max_samples > 0 and self._count >= self.max_samples)
            or (self.max_bytes > 0 and self._count > 0 and self._bytes + size > self.max_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for info, data in members:
            self._tar.addfile(info, data)
        self._count += 1
        self._bytes += size
        self.total_samples += 1

    def close(self) -> list[str]:
        self._finish()
        return self.written

    def abort(self) -> None:
        """Drop the shard being written (its ``.tmp`` file); finished shards stay."""
        if self._tar is not None:
            self._tar.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._tar, self._tmp = None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
