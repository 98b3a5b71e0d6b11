"""data.build_shards: every input kind, skip reporting, shard sizing, resizing, determinism, atomicity."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import signal
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data import build_shards, validate
from data.build_shards import EmptyBuildError, build, main, parse_size
from data.schema import KEY_RE, check_sample
from data.sources import BuildError, sanitize_key
from data.tar_index import iter_shard


def _image_bytes(size: tuple[int, int], fmt: str = "PNG", seed: int = 0) -> bytes:
    img = Image.new("RGB", size)
    img.putdata([((x * 7 + seed) % 256, (y * 5 + seed) % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _samples(pattern: str) -> list[dict]:
    out = []
    for shard in build_shards.shard_files(pattern):
        out += list(iter_shard(shard))
    return out


def _image_folder(root: Path, n: int, size: tuple[int, int] = (24, 16)) -> Path:
    for i in range(n):
        _write(root / f"img{i:02d}.png", _image_bytes(size, seed=i))
        _write(root / f"img{i:02d}.txt", f"caption {i}")
    return root


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    _write(root / "a.png", _image_bytes((32, 24)))
    _write(root / "a.txt", "a red square\n")
    _write(root / "sub/b.jpg", _image_bytes((20, 30), "JPEG", seed=3))
    _write(root / "sub/b.txt", "a green thing")
    _write(root / "c d.v2.webp", _image_bytes((16, 16), "WEBP", seed=5))  # no caption -> reconstruct
    png = _image_bytes((64, 64))
    _write(root / "trunc.png", png[: len(png) // 2])
    jpg = _image_bytes((64, 64), "JPEG")
    _write(root / "trunc.jpg", jpg[: len(jpg) // 2])
    _write(root / "text.jpg", "this is not an image")
    _write(root / "empty.png", b"")
    _write(root / "badcap.png", _image_bytes((8, 8)))
    _write(root / "badcap.txt", b"\xff\xfe caption in latin-1 \xe9")
    _write(root / "notes.md", "not an input")
    return root


def test_folder_with_corrupt_images(messy_folder: Path, tmp_path: Path) -> None:
    pattern = str(tmp_path / "out/train-%06d.tar")
    summary = build(messy_folder, pattern, shard_samples=2)

    assert summary.samples == 3 and len(summary.shards) == 2
    assert summary.skip_counts == {"bad_caption": 1, "bad_image": 4}
    skipped = {it["item"]: reason for reason, items in summary.skipped.items() for it in items}
    bad = ("empty.png", "text.jpg", "trunc.jpg", "trunc.png")
    assert skipped == {str(messy_folder / "badcap.png"): "bad_caption", **{str(messy_folder / n): "bad_image" for n in bad}}
    assert summary.ignored == [str(messy_folder / "notes.md")]
    assert summary.bytes == sum(Path(p).stat().st_size for p in summary.shards)

    on_disk = json.loads((tmp_path / "out/build_summary.json").read_text())
    assert on_disk["skip_counts"] == summary.skip_counts and on_disk["samples"] == 3

    samples = _samples(pattern)
    assert [s["__key__"] for s in samples] == ["a", "c_d_v2", "sub/b"]
    metas = {s["__key__"]: json.loads(s["json"]) for s in samples}
    assert metas == {"a": {"caption": "a red square"}, "c_d_v2": {"task": "reconstruct"}, "sub/b": {"caption": "a green thing"}}
    assert all(not check_sample(s) for s in samples)
    assert samples[0]["png"] == (messy_folder / "a.png").read_bytes()  # keep + no resize: bytes untouched
    assert "webp" in samples[1] and "jpg" in samples[2]

    # The real webdataset reader sees the same samples.
    ds = wds.WebDataset(summary.shards, shardshuffle=False, empty_check=False)
    read = [(s["__key__"], json.loads(s["json"])) for s in ds]
    assert read == [(k, metas[k]) for k in ("a", "c_d_v2", "sub/b")]

    assert validate.main([str(tmp_path / "out/train-{000000..000001}.tar"), "--no_progress"]) == 0


def test_jsonl_input(tmp_path: Path) -> None:
    imgs = tmp_path / "data/imgs"
    _write(imgs / "x.png", _image_bytes((10, 10)))
    _write(imgs / "y.jpg", _image_bytes((12, 10), "JPEG"))
    absolute = _write(tmp_path / "elsewhere/z.png", _image_bytes((9, 9)))
    lines = [
        json.dumps({"image": "imgs/x.png", "caption": "first", "source": "coco"}),
        json.dumps({"image": "imgs/missing.png", "caption": "gone"}),
        "{this is not json",
        "",
        json.dumps({"image": "imgs/y.jpg"}),
        json.dumps({"image": "imgs/x.png", "caption": "second caption of x"}),
        json.dumps({"image": str(absolute), "caption": "absolute", "id": "rec.7"}),
        json.dumps(["not", "an", "object"]),
    ]
    src = _write(tmp_path / "data/captions.jsonl", "\n".join(lines) + "\n")
    pattern = str(tmp_path / "out/cap-%03d.tar")
    summary = build(src, pattern)

    assert summary.samples == 3
    assert summary.skip_counts == {"bad_record": 3, "missing_file": 1}
    assert {it["item"] for it in summary.skipped["bad_record"]} == {f"{src}:3", f"{src}:5", f"{src}:8"}
    (missing,) = summary.skipped["missing_file"]
    assert missing["item"] == f"{src}:2" and "missing.png" in missing["message"]

    samples = _samples(pattern)
    assert [s["__key__"] for s in samples] == ["imgs/x", "imgs/x_2", "rec_7"]
    assert json.loads(samples[0]["json"]) == {"caption": "first", "source": "coco"}
    assert json.loads(samples[2]["json"])["id"] == "rec.7"
    assert [s["__key__"] for s in wds.WebDataset(summary.shards, shardshuffle=False)] == ["imgs/x", "imgs/x_2", "rec_7"]


def test_llava_input(tmp_path: Path) -> None:
    _write(tmp_path / "root/coco/1.jpg", _image_bytes((20, 20), "JPEG"))
    _write(tmp_path / "root/coco/2.png", _image_bytes((20, 20)))

    def turns(q: str) -> list[dict]:
        return [{"from": "human", "value": q}, {"from": "gpt", "value": "A cat."}]

    records = [
        {"id": "000001", "image": "coco/1.jpg", "conversations": turns("<image>\nWhat is this?")},
        {"id": "000002", "image": "coco/2.png", "conversations": turns("<image>\nCompare with <image>")},
        {"id": "000003", "image": "coco/none.jpg", "conversations": turns("<image>\nWhat?")},
        {"id": "000004", "conversations": turns("Text only.")},
        {"id": "000005", "image": "coco/2.png"},
    ]
    src = _write(tmp_path / "llava.json", json.dumps(records))
    summary = build(src, tmp_path / "out/llava-%04d.tar", image_root=tmp_path / "root")

    assert summary.samples == 1
    assert summary.skip_counts == {"bad_record": 2, "bad_schema": 1, "missing_file": 1}
    (two_images,) = summary.skipped["bad_schema"]
    assert two_images["item"] == f"{src}[1] id=000002" and "exactly once, found 2" in two_images["message"]
    assert [it["item"] for it in summary.skipped["bad_record"]] == [f"{src}[3] id=000004", f"{src}[4] id=000005"]
    (sample,) = _samples(str(tmp_path / "out/llava-%04d.tar"))
    assert sample["__key__"] == "000001"
    assert json.loads(sample["json"]) == {"id": "000001", "conversations": records[0]["conversations"]}


def test_shard_size_by_samples_and_bytes(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "imgs", 7)
    by_count = build(src, tmp_path / "a/s-%02d.tar", shard_samples=3)
    assert [len(list(iter_shard(p))) for p in by_count.shards] == [3, 3, 1]

    # Keys over 100 characters: every member needs GNU long-name header blocks, which count too.
    deep = tmp_path / "long" / ("d" * 60) / ("e" * 50)
    for i in range(7):
        _write(deep / f"img{i:02d}.png", _image_bytes((24, 16), seed=i))
    limit = 4 * 3072  # each sample: 2 long-name + 2 headers, json + png data: about 3 KB of tar blocks
    by_bytes = build(tmp_path / "long", tmp_path / "b/s-%02d.tar", shard_samples=0, shard_bytes=limit)
    assert len(by_bytes.shards) > 1 and by_bytes.samples == 7
    for shard in by_bytes.shards:
        with tarfile.open(shard) as tf:
            members = tf.getmembers()
        assert len(members[0].name) > 100
        last = members[-1]
        used = last.offset_data + (last.size + 511) // 512 * 512  # the real layout, header blocks and all
        assert used <= limit
        # the file itself: the members plus tarfile's end blocks and record padding (< 11 KiB)
        assert Path(shard).stat().st_size <= limit + 11 * 1024
    keys = [s["__key__"] for s in _samples(str(tmp_path / "b/s-%02d.tar"))]
    assert keys == [f"{'d' * 60}/{'e' * 50}/img{i:02d}" for i in range(7)]


def test_max_side_and_format(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    _write(src / "wide.png", _image_bytes((100, 40)))
    _write(src / "small.png", _image_bytes((30, 20)))
    summary = build(src, tmp_path / "out/s-%02d.tar", max_side=50, fmt="jpg")
    sizes = {s["__key__"]: Image.open(io.BytesIO(s["jpg"])).size for s in _samples(summary.pattern)}
    assert sizes == {"wide": (50, 20), "small": (30, 20)}


def test_workers_give_identical_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _image_folder(tmp_path / "imgs", 12, size=(40, 30))
    _write(src / "broken.png", b"\x89PNG\r\n\x1a\n broken")
    lines = [json.dumps({"image": f"imgs/img{i:02d}.png", "caption": f"c{i}"}) for i in range(12)]
    lines[3:3] = ["{bad json", json.dumps({"image": "imgs/broken.png", "caption": "x"})]
    jsonl = _write(tmp_path / "list.jsonl", "\n".join(lines))
    monkeypatch.setattr(build_shards, "IN_FLIGHT_PER_WORKER", 2)  # exercise the bounded window
    for name, inp in (("folder", src), ("jsonl", jsonl)):
        one = build(inp, tmp_path / f"{name}1/s-%02d.tar", shard_samples=5, max_side=20, workers=1)
        two = build(inp, tmp_path / f"{name}2/s-%02d.tar", shard_samples=5, max_side=20, workers=2)
        assert one.samples == 12 and len(one.shards) == len(two.shards) == 3
        assert [Path(p).read_bytes() for p in one.shards] == [Path(p).read_bytes() for p in two.shards]
        assert one.skipped == two.skipped and sum(one.skip_counts.values()) == (1 if name == "folder" else 2)


def test_rerun_removes_stale_shards_and_tmp(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "imgs", 7)
    pattern = str(tmp_path / "out/s-%03d.tar")
    assert len(build(src, pattern, shard_samples=3).shards) == 3
    stale_tmp = _write(tmp_path / "out/s-007.tar.tmp", b"half a shard")
    other = _write(tmp_path / "out/other-000.tar", b"not ours")  # another pattern: untouched
    for i in range(2, 7):
        (src / f"img{i:02d}.png").unlink()

    summary = build(src, pattern, shard_samples=3)
    assert summary.shards == [pattern % 0]
    assert sorted(summary.stale_removed) == sorted([str(stale_tmp), pattern % 1, pattern % 2])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["build_summary.json", "other-000.tar", "s-000.tar"]
    assert other.exists() and [s["__key__"] for s in _samples(pattern)] == ["img00", "img01"]


def test_crash_mid_write_leaves_no_partial_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _image_folder(tmp_path / "imgs", 7)
    pattern = str(tmp_path / "out/s-%03d.tar")
    build(src, pattern, shard_samples=2)  # an earlier, complete run: 4 shards
    before = {p: Path(p).read_bytes() for p in map(str, build_shards.shard_files(pattern))}

    real_addfile, calls = tarfile.TarFile.addfile, []

    def failing_addfile(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # the json member of the 4th sample: shard 1 is half written
            raise OSError("disk full (simulated)")
        return real_addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", failing_addfile)
    with pytest.raises(OSError, match="simulated"):
        build(src, pattern, shard_samples=2)
    monkeypatch.undo()

    out = tmp_path / "out"
    assert not list(out.glob("*.tmp")) and not (out / "build_summary.json").exists()
    # Shard 0 was rewritten completely; shards 1..3 are still the earlier run's complete files.
    assert {p: Path(p).read_bytes() for p in map(str, build_shards.shard_files(pattern))} == before
    assert validate.main([str(out), "--no_progress"]) == 0


def test_cli(messy_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out/t-%02d.tar")
    assert main([str(messy_folder), "--out", out, "--no_progress", "--shard_bytes", "1M"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 samples in 1 shards" in printed and "bad_image (4)" in printed and "trunc.jpg" in printed

    assert main([str(tmp_path / "nope"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(messy_folder), "--out", str(tmp_path / "no-index.tar")]) == 2
    assert "printf index" in capsys.readouterr().err
    assert main([str(_write(tmp_path / "list.csv", "a,b")), "--out", out]) == 2
    assert "--kind" in capsys.readouterr().err
    assert main([str(_write(tmp_path / "bad.json", "{")), "--out", out]) == 2
    assert "not a readable LLaVA JSON" in capsys.readouterr().err
    assert main([str(messy_folder), "--out", out, "--shard_samples", "0"]) == 2
    assert main([str(messy_folder)]) == 2  # argparse: --out is required
    with pytest.raises(BuildError, match="--workers"):
        build(messy_folder, out, workers=0)


def test_keys_and_sizes() -> None:
    assert sanitize_key("a/b c.d/e.v1") == "a/b_c_d/e_v1"
    assert sanitize_key("../x/./y") == "x/y" and sanitize_key("...") == "___" and sanitize_key("") == "sample"
    assert all(KEY_RE.match(sanitize_key(s)) for s in ("é/ü", "a:b", "x\\y", "/abs/path"))
    assert parse_size("1500") == 1500 and parse_size("2k") == 2000 and parse_size("1.5G") == 1_500_000_000
    assert parse_size("64MiB") == 64 * 2**20 and parse_size("2KiB") == 2048 and parse_size("1GB") == 10**9
    for bad in ("64i", "1b", "k", "1.5.2M", "12 apples"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
            parse_size(bad)


# ----------------------------------------------------------------------------- review regressions


class _KillsTheWorker:
    """Unpickling this runs ``os._exit(1)``: the spawn worker that receives the item dies (like an OOM kill)."""

    def __reduce__(self):
        return os._exit, (1,)


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def hung(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the build hangs")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_dead_worker_is_reported_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _image_folder(tmp_path / "imgs", 6)
    read_items = build_shards.read_items

    def with_a_killer(*args):
        items, total, ignored = read_items(*args)
        items = [dataclasses.replace(it, meta={"task": "reconstruct", "x": _KillsTheWorker()})
                 if it.key == "img03" else it for it in items]
        return iter(items), total, ignored

    monkeypatch.setattr(build_shards, "read_items", with_a_killer)
    t0 = time.monotonic()
    with _deadline(60):
        summary = build(src, tmp_path / "out/s-%02d.tar", workers=2)
    assert time.monotonic() - t0 < 60
    # only the item that kills a worker on its own is skipped; the others in flight were retried
    assert summary.skip_counts == {"worker_crashed": 1}
    (crashed,) = summary.skipped["worker_crashed"]
    assert crashed["item"] == str(src / "img03.png") and "died" in crashed["message"]
    assert [s["__key__"] for s in _samples(summary.pattern)] == ["img00", "img01", "img02", "img04", "img05"]


def test_rerun_that_writes_nothing_deletes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _image_folder(tmp_path / "data/imgs", 3)
    src = _write(tmp_path / "data/list.jsonl", "".join(
        json.dumps({"image": f"imgs/img{i:02d}.png", "caption": f"c{i}"}) + "\n" for i in range(3)))
    pattern = str(tmp_path / "out/s-%03d.tar")
    good = build(src, pattern, shard_samples=2)
    before = {p: Path(p).read_bytes() for p in good.shards}
    summary_json = (tmp_path / "out/build_summary.json").read_bytes()

    with pytest.raises(EmptyBuildError, match="no sample was written") as e:  # a wrong --image_root
        build(src, pattern, shard_samples=2, image_root=tmp_path)
    assert e.value.summary.skip_counts == {"missing_file": 3} and e.value.summary.stale_removed == []
    assert {p: Path(p).read_bytes() for p in good.shards} == before
    assert (tmp_path / "out/build_summary.json").read_bytes() == summary_json  # the good build's summary
    failed = tmp_path / "out/build_summary.failed.json"
    assert json.loads(failed.read_text())["skip_counts"] == {"missing_file": 3}

    assert main([str(src), "--out", pattern, "--image_root", str(tmp_path), "--no_progress"]) == 1
    out, err = capsys.readouterr()
    assert "error: no sample was written (3 missing_file)" in err and "missing_file (3)" in out
    assert {p: Path(p).read_bytes() for p in good.shards} == before
    empty = _write(tmp_path / "empty.jsonl", "\n")
    assert main([str(empty), "--out", pattern, "--no_progress"]) == 1
    assert "the input has no items" in capsys.readouterr().err

    again = build(src, pattern, shard_samples=2)  # a good build clears the failed attempt's report
    assert again.stale_removed == [str(failed)] and not failed.exists()


def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _write(root / "a.png", _image_bytes((8, 8)))
    _write(root / "sub/b.png", _image_bytes((8, 8), seed=1))
    _write(tmp_path / "elsewhere/c.png", _image_bytes((8, 8), seed=2))
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "sub/loop").symlink_to(root, target_is_directory=True)  # a cycle
    (root / "sub/twice").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with _deadline(30):
        summary = build(root, tmp_path / "out/s-%02d.tar")
    assert [s["__key__"] for s in _samples(summary.pattern)] == ["a", "linked/c", "sub/b"]
    assert len(summary.ignored) == 2
    loop, twice = summary.ignored
    assert loop == f"{root / 'sub/loop'}/ (the folder {root.resolve()}, already read as {root})"
    assert twice == f"{root / 'sub/twice'}/ (the folder {(tmp_path / 'elsewhere').resolve()}, already read as {root / 'linked'})"


def test_sidecars_match_any_case_and_lose_their_bom(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _write(root / "IMG_1.JPG", _image_bytes((8, 8), "JPEG"))
    _write(root / "IMG_1.TXT", "\ufeffa camera photo\n".encode())
    _write(root / "two.png", _image_bytes((8, 8)))
    _write(root / "two.txt", "one caption")
    _write(root / "two.Txt", "another caption")
    summary = build(root, tmp_path / "out/s-%02d.tar")
    (sample,) = _samples(summary.pattern)
    assert sample["__key__"] == "IMG_1" and json.loads(sample["json"]) == {"caption": "a camera photo"}
    assert summary.skip_counts == {"bad_caption": 1} and "several caption files" in summary.skipped["bad_caption"][0]["message"]
    assert summary.ignored == []


def test_mpo_camera_jpeg_stays_jpg(tmp_path: Path) -> None:
    first, second = Image.new("RGB", (16, 12), (200, 10, 10)), Image.new("RGB", (16, 12), (10, 200, 10))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    mpo = _write(tmp_path / "images/cam.jpg", buf.getvalue())
    assert Image.open(mpo).format == "MPO"
    summary = build(tmp_path / "images", tmp_path / "out/s-%02d.tar")
    (sample,) = _samples(summary.pattern)
    assert "png" not in sample and sample["jpg"] == mpo.read_bytes()  # the original bytes, not re-encoded


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (30, 90, 200)).save(buf, "JPEG", exif=exif)
    _write(tmp_path / "images/phone.jpg", buf.getvalue())
    _write(tmp_path / "images/plain.jpg", _image_bytes((20, 10), "JPEG"))
    summary = build(tmp_path / "images", tmp_path / "out/s-%02d.tar")
    sizes = {s["__key__"]: Image.open(io.BytesIO(s["jpg"])).size for s in _samples(summary.pattern)}
    assert sizes == {"phone": (10, 20), "plain": (20, 10)}
    assert _samples(summary.pattern)[1]["jpg"] == (tmp_path / "images/plain.jpg").read_bytes()


def test_deeply_nested_json_is_a_bad_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "x.png", _image_bytes((8, 8)))
    lines = ["[" * 100_000, json.dumps({"image": "x.png", "caption": "fine"}), '{"a": ' * 50_000]
    src = _write(tmp_path / "deep.jsonl", "\ufeff" + "\n".join(lines) + "\n")  # and a BOM on line 1
    summary = build(src, tmp_path / "out/s-%02d.tar")
    assert summary.samples == 1 and summary.skip_counts == {"bad_record": 2}
    assert [it["item"] for it in summary.skipped["bad_record"]] == [f"{src}:1", f"{src}:3"]
    assert all("nested too deeply" in it["message"] for it in summary.skipped["bad_record"])
    llava = _write(tmp_path / "deep.json", "[" * 100_000)
    assert main([str(llava), "--out", str(tmp_path / "o2/s-%02d.tar"), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert str(llava) in err and "nested too deeply" in err


@pytest.mark.parametrize("pattern,message", [
    ("50%/s-%03d.tar", "folder part must not contain '%'"),
    ("out/s-%5d.tar", "%d or %0Nd"),
    ("out/s-%03d-%03d.tar", "%d or %0Nd"),
    ("out/s-%03x.tar", "%d or %0Nd"),
])
def test_out_pattern_is_checked(tmp_path: Path, pattern: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = _image_folder(tmp_path / "imgs", 1)
    assert main([str(src), "--out", str(tmp_path / pattern), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("build_shards: error: --out") and message in err and "Traceback" not in err


def test_plain_percent_d_pattern_and_its_stale_shards(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "imgs", 12)
    pattern = str(tmp_path / "out/s-%d.tar")
    assert len(build(src, pattern, shard_samples=1).shards) == 12
    for i in range(2, 12):
        (src / f"img{i:02d}.png").unlink()
    summary = build(src, pattern, shard_samples=1)
    assert sorted(summary.stale_removed) == sorted(pattern % i for i in range(2, 12))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["s-0.tar", "s-1.tar"]
