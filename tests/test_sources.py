"""The formats datasets ship in: a save_to_disk dataset, parquet files and img2dataset tars build the same
shards as the equivalent folder + JSONL; bad rows are skipped and counted by reason."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.build_shards import build
from data.sources import Columns, detect_kind
from data.tar_index import iter_shard

datasets = pytest.importorskip("datasets")
N = 6


def png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def samples(pattern_dir: Path) -> list[dict]:
    out = []
    for shard in sorted(pattern_dir.glob("*.tar")):
        for s in iter_shard(shard):
            out.append({"key": s["__key__"], "png": s["png"], "json": json.loads(s["json"])})
    return out


@pytest.fixture(scope="module")
def records():
    return [{"id": f"img{i}", "caption": f"a picture number {i}", "source": "test", "image": png(i)} for i in range(N)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, records):
    """The same records as a folder of PNGs + a captions JSONL."""
    root = tmp_path_factory.mktemp("jsonl")
    (root / "images").mkdir()
    lines = []
    for r in records:
        (root / "images" / f"{r['id']}.png").write_bytes(r["image"])
        lines.append(json.dumps({"id": r["id"], "image": f"images/{r['id']}.png", "caption": r["caption"],
                                 "source": r["source"]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    summary = build(root / "captions.jsonl", root / "out/s-%03d.tar", shard_samples=4)
    assert summary.samples == N and not summary.skipped
    return samples(root / "out")


def hf_dataset(records):
    rows = {k: [r[k] for r in records] for k in ("id", "caption", "source")}
    rows["image"] = [{"bytes": r["image"], "path": None} for r in records]
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


def test_parquet_and_save_to_disk_build_what_folder_plus_jsonl_builds(tmp_path, records, reference):
    ds = hf_dataset(records)
    ds.to_parquet(str(tmp_path / "data.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert detect_kind(tmp_path / "data.parquet") == "parquet" and detect_kind(tmp_path / "saved") == "hf_dataset"
    for name, src in (("parquet", tmp_path / "data.parquet"), ("saved", tmp_path / "saved")):
        summary = build(src, tmp_path / name / "s-%03d.tar", shard_samples=4, workers=2)
        assert summary.samples == N and not summary.skipped, summary.format()
        assert samples(tmp_path / name) == reference, name


def test_plain_parquet_with_a_binary_column_and_other_names(tmp_path, records, reference):
    """A parquet file written without Hugging Face metadata: image bytes in a binary column named 'jpg_bytes'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [r["id"] for r in records], "jpg_bytes": [r["image"] for r in records],
                      "text": [r["caption"] for r in records], "source": [r["source"] for r in records]})
    (tmp_path / "shards").mkdir()
    pq.write_table(table.slice(0, 3), tmp_path / "shards" / "part-0.parquet")
    pq.write_table(table.slice(3), tmp_path / "shards" / "part-1.parquet")
    summary = build(tmp_path / "shards", tmp_path / "out/s-%03d.tar", shard_samples=4,
                    columns=Columns(image="jpg_bytes", caption="text"))
    assert summary.kind == "parquet" and summary.samples == N and not summary.skipped
    assert samples(tmp_path / "out") == reference


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path, records):
    rows = {"id": [], "caption": [], "image": []}
    good = {"id": "ok", "caption": "fine", "image": records[0]["image"]}
    for r in (good, {**good, "id": "corrupt", "image": b"not an image"}, {**good, "id": "noimage", "image": None},
              {**good, "id": "empty", "caption": "  "}, {**good, "id": "nocaption", "caption": None}):
        for k in rows:
            rows[k].append(r[k])
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "bad.parquet"))
    summary = build(tmp_path / "bad.parquet", tmp_path / "out/s-%03d.tar")
    assert summary.samples == 1
    assert summary.skip_counts == {"bad_caption": 1, "bad_image": 1, "missing_column": 2}
    assert {s["item"].split("[")[1].rstrip("]") for s in summary.skipped["missing_column"]} == {"2", "4"}


def test_img2dataset_tars_build(tmp_path, records):
    """img2dataset's layout: <key>.jpg + <key>.txt + <key>.json per sample (here PNG bytes under .png)."""
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "00000.tar", "w") as tar:
        for i, r in enumerate(records):
            key = f"{i:09d}"
            meta = {"url": f"http://x/{i}", "key": key, "status": "success", "width": 24, "caption": "ignored"}
            members = {"png": r["image"], "txt": r["caption"].encode(), "json": json.dumps(meta).encode()}
            if i == 1:
                members.pop("png")  # no image member
            if i == 2:
                members["txt"] = b"   "  # empty caption
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert detect_kind(tmp_path / "wds") == "wds"
    summary = build(tmp_path / "wds", tmp_path / "out/s-%03d.tar")
    assert summary.samples == N - 2 and summary.skip_counts == {"bad_caption": 1, "missing_column": 1}
    got = samples(tmp_path / "out")
    assert got[0]["key"] == "000000000" and got[0]["png"] == records[0]["image"]
    assert got[0]["json"] == {"url": "http://x/0", "key": "000000000", "status": "success", "width": 24,
                              "caption": records[0]["caption"]}
