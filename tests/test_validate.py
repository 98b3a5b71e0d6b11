"""data.validate: clean shard sets pass; corrupt images, corrupt tar headers and unusable shards fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.schema import make_sample
from data.shard_writer import ShardWriter
from data.tar_index import BLOCK, index_shard
from data.validate import expand, main, validate


def _write_shards(pattern: str, n: int, per_shard: int = 3, prefix: str = "s") -> list[str]:
    with ShardWriter(pattern, max_samples=per_shard) as writer:
        for i in range(n):
            img = Image.new("RGB", (16, 12), (i * 20 % 256, 40, 200))
            codes = np.full((2, 2, 3), i, dtype=np.int16) if i % 2 else None
            writer.write(make_sample(f"{prefix}/{i:04d}", img, {"caption": f"sample {i}"}, codes=codes))
    return writer.written


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    return _write_shards(str(tmp_path / "good/train-%06d.tar"), 6)


def _corrupt_copy(src: str, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(src, dst_dir / Path(src).name))


def test_valid_set_passes(shards: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "report.json"
    pattern = str(tmp_path / "good/train-{000000..000001}.tar")
    assert main([pattern, "--json", str(report_path), "--no_progress"]) == 0
    assert "OK" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert (report["shards"], report["samples"], report["valid"], report["errors"]) == (2, 6, 6, {})
    assert expand([pattern]) == shards and expand([str(tmp_path / "good")]) == shards


def test_corrupt_image_bytes_fail(shards: list[str], tmp_path: Path) -> None:
    bad = _corrupt_copy(shards[1], tmp_path / "bad")
    idx = index_shard(bad)
    i = 1
    off, size = idx.spans[i][idx.exts[i].index("png")]
    with open(bad, "r+b") as f:  # keep the PNG signature, destroy everything after it
        f.seek(int(off) + 8)
        f.write(b"\x00garbage" * ((int(size) - 8) // 8))

    report = validate([shards[0], str(bad)])
    assert not report.ok and report.errors == {"bad_image": 1}
    assert (report.shards, report.samples, report.valid) == (2, 6, 5)
    assert report.examples["bad_image"][0].startswith(f"{bad}:{idx.keys[i]}: ")
    assert main([shards[0], str(bad), "--no_progress"]) == 1


def test_corrupt_tar_header_fails(shards: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _corrupt_copy(shards[0], tmp_path / "bad")
    idx = index_shard(bad)
    header = int(idx.spans[1][0, 0]) - BLOCK  # the header of sample 1's first member (its json)
    with open(bad, "r+b") as f:
        f.seek(header)
        f.write(b"\xff" * BLOCK)

    report_path = tmp_path / "report.json"
    assert main([str(bad), "--json", str(report_path), "--no_progress"]) == 1
    report = json.loads(report_path.read_text())
    assert report["errors"]["corrupt_tar"] == 1 and report["tar_errors"] == 1
    assert report["errors"]["missing_json"] == 1  # sample 1 lost its json member with the header
    assert report["samples"] == 3 and report["valid"] == 2
    assert "corrupt_tar: 1" in capsys.readouterr().out


def test_unusable_shards_and_duplicate_keys(shards: list[str], tmp_path: Path) -> None:
    not_tar = tmp_path / "bad/not-a-tar.tar"
    not_tar.parent.mkdir()
    not_tar.write_bytes(b"hello" * 300)
    again = _write_shards(str(tmp_path / "again/x-%02d.tar"), 2)  # keys s/0000, s/0001 again

    report = validate([*shards, str(not_tar), str(tmp_path / "missing.tar"), *again])
    assert report.errors == {"unusable_shard": 2, "duplicate_key": 2}
    assert (report.shards, report.samples, report.valid) == (5, 8, 6)
    assert any("not a tar file" in ex for ex in report.examples["unusable_shard"])
    assert any("shard not found" in ex for ex in report.examples["unusable_shard"])


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2  # an empty folder: nothing to validate
    assert "no shards found" in capsys.readouterr().err
    assert main([]) == 2


def test_a_shard_named_twice_is_read_once(shards: list[str], tmp_path: Path) -> None:
    folder = str(tmp_path / "good")
    via_link = tmp_path / "link.tar"
    via_link.symlink_to(shards[0])
    assert expand([shards[0], folder, str(via_link)]) == shards  # first-named order, each file once
    report = validate([shards[0], shards[0], str(via_link), *shards])
    assert report.ok and (report.shards, report.samples, report.valid) == (2, 6, 6)
    assert main([shards[1], folder, "--no_progress"]) == 0


def test_deeply_nested_json_member_is_bad_json(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path / "deep-%02d.tar"), max_samples=10) as writer:
        img = Image.new("RGB", (8, 8))
        writer.write(make_sample("ok", img, {"caption": "fine"}))
        writer.write({**make_sample("deep", img, {"caption": "x"}), "json": b"[" * 200_000})
    report = validate(writer.written)
    assert report.errors == {"bad_json": 1} and (report.samples, report.valid) == (2, 1)
    assert report.examples["bad_json"][0].startswith(f"{writer.written[0]}:deep: json:")
