"""unimllm.stages.precompute_codes: codes equal the loader-cropped encode, members untouched, skips counted, resume, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import validate
from data.config import DataConfig, ImageConfig, SourceConfig
from data.loader import ImageTextDecoder, SampleContext, StreamingLoader
from data.schema import CODES_EXT, decode_codes, make_sample
from data.shard_writer import ShardWriter
from data.tar_index import iter_shard
from data.transforms import normalize
from tokenizer.config import TokenizerConfig
from tokenizer.model import EvoTokenizer
from unimllm.stages.precompute_codes import (
    MANIFEST_NAME,
    codes_mismatch,
    main,
    precompute,
    read_codes_manifest,
    tokenizer_fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]

# (size, ext): smaller/larger/non-square than 64 px, so both crop paths (and JPEG shrink) are exercised
IMAGES = [((80, 64), "png"), ((150, 130), "jpg"), ((64, 64), "png"), ((70, 90), "webp"), ((64, 96), "jpg")]


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([xx * 3 + seed * 20, yy * 2, (xx + yy) * 5 % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def _write_shard(path: Path, first: int, n: int, bad: dict[int, str] | None = None) -> None:
    with ShardWriter(str(path).replace(".tar", "%.0s.tar"), max_samples=1000) as w:
        for i in range(first, first + n):
            size, ext = IMAGES[i % len(IMAGES)]
            codes = np.zeros((2, 2, 1), np.int64) if i % 3 == 0 else None  # stale codes: replaced
            meta = {"caption": f"image {i}", "task": "understand"} if i % 2 else {"task": "reconstruct"}
            s = make_sample(f"s{i:04d}", _image(size, i), meta, ext=ext, codes=codes)
            kind = (bad or {}).get(i)
            if kind == "image":
                s[ext] = s[ext][: len(s[ext]) // 3]  # truncated image
            elif kind == "json":
                s["json"] = b"{not json"
            w.write(s)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tok")
    EvoTokenizer(TokenizerConfig(), with_teacher=False).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    _write_shard(d / "part-000.tar", 0, 7)
    _write_shard(d / "part-001.tar", 7, 5)
    return d


def _samples(path: Path) -> dict[str, dict]:
    return {s["__key__"]: {k: v for k, v in s.items() if k != "__shard__"} for s in iter_shard(path)}


def test_codes_match_loader_crop_and_members_are_untouched(tok_dir: Path, shards: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "out"
    summary = precompute(tok_dir, str(shards / "part-{000..001}.tar"), out, batch_size=3)
    assert summary["samples"] == 12 and summary["skip_counts"] == {} and len(summary["written"]) == 2

    tok = EvoTokenizer.from_pretrained(tok_dir, with_teacher=False)
    decoder = ImageTextDecoder(DataConfig(image=ImageConfig(resolution=64, crop="center", flip=False)))
    for name in ("part-000.tar", "part-001.tar"):
        src, dst = _samples(shards / name), _samples(out / name)
        assert list(dst) == list(src)
        for key, raw in src.items():
            got = decode_codes(dst[key].pop(CODES_EXT))
            raw.pop(CODES_EXT, None)
            assert dst[key] == raw  # every other member byte for byte
            img = decoder({**raw, "__key__": key}, SampleContext([0]))["image"]  # (64, 64, 3) uint8
            want = tok.encode(normalize(torch.from_numpy(np.array(img))[None]))[0]  # (8, 8, 8)
            assert got.dtype == np.uint16 and np.array_equal(got.astype(np.int64), want.numpy()), key

    m = read_codes_manifest(out / "part-000.tar")
    assert m["tokenizer_sha256"] == tokenizer_fingerprint(tok_dir) and m["grid"] == [8, 8] and m["depth"] == 8
    assert m["codebook_size"] == 512 and m["resolution"] == 64 and m["samples"] == 12
    assert {k: e["samples"] for k, e in m["shards"].items()} == {"part-000.tar": 7, "part-001.tar": 5}
    assert codes_mismatch(out / "part-001.tar", m["tokenizer_sha256"]) is None
    assert "not" in codes_mismatch(out / "part-001.tar", "0" * 64)
    assert codes_mismatch(shards / "part-001.tar", m["tokenizer_sha256"]) is not None  # no manifest there

    cfg = DataConfig(sources=[SourceConfig(shards=str(out / "part-{000..001}.tar"))], batch_size=4, num_workers=0,
                     shuffle_buffer=0, image=ImageConfig(resolution=64))
    batches = list(StreamingLoader(cfg))
    assert [b["codes"].shape for b in batches] == [(4, 8, 8, 8)] * 3
    assert all(b["codes"].dtype == torch.int64 for b in batches)
    assert validate.main([str(out / "part-{000..001}.tar"), "--no_progress"]) == 0  # (e)


def test_bad_samples_skipped_and_counted(tok_dir: Path, tmp_path: Path, caplog) -> None:
    torch.set_num_threads(1)
    _write_shard(tmp_path / "in" / "bad-0.tar", 0, 6, bad={1: "image", 4: "image", 2: "json"})
    out = tmp_path / "out"
    summary = precompute(tok_dir, [str(tmp_path / "in" / "bad-0.tar")], out, batch_size=4)
    assert summary["samples"] == 3 and summary["skip_counts"] == {"bad_image": 2, "bad_json": 1}
    assert "s0001" in summary["skip_examples"]["bad_image"] and "s0002" in summary["skip_examples"]["bad_json"]
    assert sum("skipped" in r.message for r in caplog.records) == 2  # the first example of each reason
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["skip_counts"] == {"bad_image": 2, "bad_json": 1}
    assert manifest["shards"]["bad-0.tar"]["samples"] == 3
    assert list(_samples(out / "bad-0.tar")) == ["s0000", "s0003", "s0005"]
    assert validate.main([str(out / "bad-0.tar"), "--no_progress"]) == 0


def test_resume_overwrite_and_atomic_shards(tok_dir: Path, shards: Path, tmp_path: Path, monkeypatch) -> None:
    torch.set_num_threads(1)
    out, pattern = tmp_path / "out", str(shards / "part-{000..001}.tar")
    first = precompute(tok_dir, pattern, out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = precompute(tok_dir, pattern, out)
    assert again["samples"] == 0 and again["written"] == [] and len(again["resumed"]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamp
    assert json.loads((out / MANIFEST_NAME).read_text())["samples"] == 12

    redo = precompute(tok_dir, pattern, out, overwrite=True)
    assert redo["samples"] == 12 and redo["resumed"] == [] and redo["written"] == first["written"]

    manifest = json.loads((out / MANIFEST_NAME).read_text())  # another tokenizer made shard 1: redone
    manifest["shards"]["part-001.tar"]["tokenizer_sha256"] = "0" * 64
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    part = precompute(tok_dir, pattern, out)
    assert part["written"] == [str(out / "part-001.tar")] and part["resumed"] == [str(out / "part-000.tar")]

    # A crash mid-shard leaves neither a final-named shard nor a .tmp file, and no manifest entry.
    import unimllm.stages.precompute_codes as pc

    calls = {"n": 0}
    real = pc._Encoder.codes

    def crash_on_second(self, images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(self, images)

    monkeypatch.setattr(pc._Encoder, "codes", crash_on_second)
    with pytest.raises(RuntimeError, match="boom"):
        precompute(tok_dir, pattern, tmp_path / "crash", batch_size=4)
    assert sorted(p.name for p in (tmp_path / "crash").iterdir()) == []


def test_cli_errors_name_the_argument(tok_dir: Path, shards: Path, tmp_path: Path, capsys) -> None:
    args = ["--shards", str(shards / "part-000.tar"), "--out", str(tmp_path / "o"), "--no_progress"]
    cli = [sys.executable, "-m", "unimllm.stages.precompute_codes", "--tokenizer", str(tmp_path / "nope"), *args]
    res = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--tokenizer" in res.stderr and str(tmp_path / "nope") in res.stderr
    assert "Traceback" not in res.stderr

    missing = str(shards / "part-009.tar")
    assert main(["--tokenizer", str(tok_dir), "--shards", missing, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--shards" in err and missing in err

    assert main(["--tokenizer", str(tok_dir), "--shards", str(shards / "part-000.tar"), "--out", str(shards)]) == 2
    assert "--out" in capsys.readouterr().err  # never overwrite the input shards

    not_tar = tmp_path / "junk.tar"
    not_tar.write_bytes(b"x" * 2048)
    assert main(["--tokenizer", str(tok_dir), "--shards", str(not_tar), "--out", str(tmp_path / "o2"), "--no_progress"]) == 2
    assert "not a tar file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ranks, kill and resume


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("three")
    for i, (first, n) in enumerate([(0, 6), (6, 5), (11, 4)]):
        _write_shard(d / f"part-{i:03d}.tar", first, n, bad={3: "image"} if i == 0 else None)
    return d


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def one_rank(tok_dir: Path, three_shards: Path, tmp_path_factory) -> dict[str, bytes]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("one") / "out"
    s = precompute(tok_dir, str(three_shards / "part-{000..002}.tar"), out, batch_size=4)
    assert s["merged"] and s["samples"] == 14 and s["skip_counts"] == {"bad_image": 1}
    return _files(out)


def test_two_ranks_write_the_same_bytes_as_one(tok_dir: Path, three_shards: Path, one_rank, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "out"
    pattern = str(three_shards / "part-{000..002}.tar")
    r1 = precompute(tok_dir, pattern, out, batch_size=4, rank=1, world_size=2)
    assert not r1["merged"] and not (out / MANIFEST_NAME).exists()  # rank 0 has not finished
    assert [Path(p).name for p in r1["written"]] == ["part-001.tar"]
    r0 = precompute(tok_dir, pattern, out, batch_size=4, rank=0, world_size=2)
    assert r0["merged"] and [Path(p).name for p in r0["written"]] == ["part-000.tar", "part-002.tar"]
    assert _files(out) == one_rank  # the shards and codes_manifest.json, byte for byte; no partial left
    with pytest.raises(Exception, match="rank 2 is not in"):
        precompute(tok_dir, pattern, out, rank=2, world_size=2)


def test_rank_and_world_come_from_the_launcher_environment(monkeypatch) -> None:
    from unimllm.stages.precompute_codes import rank_world

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_world() == (3, 4) and rank_world(0, 1) == (0, 1)


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory) -> Path:
    """Four shards of 30 samples: enough work after the first shard that a kill lands before the last."""
    d = tmp_path_factory.mktemp("long")
    for i in range(4):
        _write_shard(d / f"part-{i:03d}.tar", 30 * i, 30)
    return d


def test_kill_9_mid_run_then_rerun_gives_the_same_bytes(tok_dir: Path, long_shards: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    pattern = str(long_shards / "part-{000..003}.tar")
    precompute(tok_dir, pattern, tmp_path / "ref", batch_size=4)
    reference = _files(tmp_path / "ref")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "unimllm.stages.precompute_codes", "--tokenizer", str(tok_dir), "--shards", pattern,
           "--out", str(out), "--batch_size", "4", "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out / "codes_manifest.rank00000-of-00001.json"
    deadline = time.monotonic() + 120
    while not (partial.exists() and json.loads(partial.read_text())["shards"]) and proc.poll() is None:
        assert time.monotonic() < deadline, "the first shard never finished"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # inside the second shard
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / MANIFEST_NAME).exists()  # only the merge at the end writes it
    done = set(json.loads(partial.read_text())["shards"])
    assert done and len(done) < 4, done
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{len(done)} shards already done (resumed)" in res.stdout
    assert _files(out) == reference
