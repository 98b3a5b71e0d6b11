"""Streaming loader: exact per-epoch coverage across ranks x workers, determinism, exact resume, skips."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import DataConfig, ImageConfig, SourceConfig
from data.loader import StreamingLoader, expand_shards
from data.schema import BAD_IMAGE, BAD_JSON, make_sample
from data.shard_writer import ShardWriter
from data.tar_index import ShardError, index_shard
from data.transforms import normalize
from unimllm.config import ConfigError, from_dict


def _image(i: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def write_shards(root, prefix: str, n: int, per_shard: int, bad: dict[int, str] | None = None) -> str:
    """n samples in ceil(n/per_shard) shards; ``bad`` maps sample index -> 'image' | 'json' corruption."""
    bad = bad or {}
    with ShardWriter(str(root / f"{prefix}-%06d.tar"), max_samples=per_shard) as w:
        for i in range(n):
            s = make_sample(f"{prefix}{i:05d}", _image(i), {"caption": f"sample {i}", "i": i})
            if bad.get(i) == "image":
                s["png"] = s["png"][: len(s["png"]) // 2]  # truncated PNG
            if bad.get(i) == "json":
                s["json"] = b"{not json"
            w.write(s)
    last = (n - 1) // per_shard
    return str(root / f"{prefix}-{{000000..{last:06d}}}.tar")


def cfg_for(pattern: str, **kw) -> DataConfig:
    image = kw.pop("image", ImageConfig(resolution=16))
    return DataConfig(sources=[SourceConfig(shards=pattern)], image=image, **kw)


def epoch_keys(loaders) -> list[list[str]]:
    return [[k for b in ld for k in b["__key__"]] for ld in loaders]


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return write_shards(root, "s", n=45, per_shard=15)  # 3 shards of 15


def test_two_ranks_two_workers_cover_epoch_exactly_once(three_shards):
    world = 2
    cfg = cfg_for(three_shards, batch_size=4, num_workers=2, shuffle_buffer=8, seed=3)
    loaders = [StreamingLoader(cfg, rank=r, world_size=world) for r in range(world)]
    everything = {f"s{i:05d}" for i in range(45)}
    seen_by_epoch = []
    for _ in range(2):
        per_rank = epoch_keys(loaders)
        flat = [k for ks in per_rank for k in ks]
        assert len(flat) == 45 and set(flat) == everything  # no duplicate, no missing
        assert sum(ld.num_samples() for ld in loaders) == 45
        seen_by_epoch.append(per_rank)
    assert seen_by_epoch[0] != seen_by_epoch[1]  # reshuffled per epoch
    assert all(ld.epoch == 2 for ld in loaders)
    # the same seed gives the same order; another seed does not
    again = epoch_keys([StreamingLoader(cfg, rank=r, world_size=world) for r in range(world)])
    assert again == seen_by_epoch[0]
    cfg2 = cfg_for(three_shards, batch_size=4, num_workers=2, shuffle_buffer=8, seed=4)
    assert epoch_keys([StreamingLoader(cfg2, rank=r, world_size=world) for r in range(world)]) != again


@pytest.mark.parametrize("num_workers,world", [(0, 1), (1, 3), (5, 2)])
def test_more_workers_than_shards_and_no_workers(three_shards, num_workers, world):
    cfg = cfg_for(three_shards, batch_size=5, num_workers=num_workers, shuffle_buffer=0)
    flat = [k for ks in epoch_keys([StreamingLoader(cfg, rank=r, world_size=world) for r in range(world)]) for k in ks]
    assert sorted(flat) == [f"s{i:05d}" for i in range(45)]


def _run(cfg, rank, world, n_batches, state=None):
    ld = StreamingLoader(cfg, rank=rank, world_size=world)
    if state is not None:
        ld.load_state_dict(state)
    out, it = [], ld.batches()
    for _ in range(n_batches):
        out.append(next(it))
    return out, ld.state_dict()


@pytest.mark.parametrize("split_at", [1, 3, 6])
def test_resume_mid_epoch_continues_exactly(three_shards, split_at):
    """2 ranks x 2 workers; stop after k batches, restore, continue: same batches, tensors bitwise equal."""
    cfg = cfg_for(three_shards, batch_size=3, num_workers=2, shuffle_buffer=6, seed=7,
                  image=ImageConfig(resolution=16, crop="random", flip=True))
    total = 14  # crosses into the second epoch (each rank has 8 batches per epoch)
    for rank in range(2):
        full, _ = _run(cfg, rank, 2, total)
        head, state = _run(cfg, rank, 2, split_at)
        state = json.loads(json.dumps(state))  # the state must survive a JSON round trip
        tail, _ = _run(cfg, rank, 2, total - split_at, state)
        resumed = head + tail
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full]
        for a, b in zip(resumed, full):
            assert torch.equal(a["image"], b["image"])  # random crop + flip reproduced exactly
        # the remaining samples of the interrupted epoch are exactly the unseen ones
        seen = {k for b in head for k in b["__key__"]}
        rest_of_epoch = [k for b in tail[: 8 - split_at] for k in b["__key__"]]
        assert not seen & set(rest_of_epoch)


def test_resume_at_epoch_boundary_starts_next_epoch(three_shards):
    cfg = cfg_for(three_shards, batch_size=4, num_workers=2, shuffle_buffer=4)
    ld = StreamingLoader(cfg)
    first = [b["__key__"] for b in ld]
    state = ld.state_dict()
    assert state["epoch"] == 1
    ld2 = StreamingLoader(cfg)
    ld2.load_state_dict(state)
    nxt = [b["__key__"] for b in ld2]
    ref = StreamingLoader(cfg)
    list(ref)
    assert nxt == [b["__key__"] for b in ref] and nxt != first


def test_state_from_another_topology_is_rejected(three_shards):
    cfg = cfg_for(three_shards, num_workers=2)
    state = StreamingLoader(cfg).state_dict()
    other = StreamingLoader(cfg_for(three_shards, num_workers=1))
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)


def test_weights_repeat_in_epoch_mode_and_mix_when_resampled(tmp_path):
    a = write_shards(tmp_path, "a", n=10, per_shard=5)
    b = write_shards(tmp_path, "b", n=10, per_shard=5)
    cfg = DataConfig(sources=[SourceConfig(shards=a, weight=2), SourceConfig(shards=b, weight=1)],
                     batch_size=5, num_workers=2, image=ImageConfig(resolution=16))
    keys = [k for b_ in StreamingLoader(cfg) for k in b_["__key__"]]
    assert len(keys) == 30
    assert all(keys.count(f"a{i:05d}") == 2 and keys.count(f"b{i:05d}") == 1 for i in range(10))

    cfg = DataConfig(sources=[SourceConfig(shards=a, weight=3), SourceConfig(shards=b, weight=1)],
                     resampled=True, batch_size=10, num_workers=0, image=ImageConfig(resolution=16))
    it = StreamingLoader(cfg).batches()
    drawn = [k for _ in range(40) for k in next(it)["__key__"]]
    frac_a = sum(k.startswith("a") for k in drawn) / len(drawn)
    assert 0.70 < frac_a < 0.80  # 400 draws, p = 0.75


def test_resampled_resume_is_exact(three_shards):
    cfg = DataConfig(sources=[SourceConfig(shards=three_shards)], resampled=True, batch_size=4,
                     num_workers=2, shuffle_buffer=5, image=ImageConfig(resolution=16))
    full, _ = _run(cfg, 1, 2, 9)
    head, state = _run(cfg, 1, 2, 4)
    tail, _ = _run(cfg, 1, 2, 5, state)
    assert [b["__key__"] for b in head + tail] == [b["__key__"] for b in full]


def test_bad_samples_are_skipped_and_counted(tmp_path):
    pattern = write_shards(tmp_path, "x", n=20, per_shard=10, bad={3: "image", 11: "json", 12: "image"})
    cfg = cfg_for(pattern, batch_size=4, num_workers=2)
    ld = StreamingLoader(cfg)
    keys = [k for b in ld for k in b["__key__"]]
    assert len(keys) == 17 and not {"x00003", "x00011", "x00012"} & set(keys)
    assert ld.skip_counts() == {BAD_IMAGE: 2, BAD_JSON: 1}
    assert "x00003" in ld.skip_examples[BAD_IMAGE] or "x00012" in ld.skip_examples[BAD_IMAGE]
    # counts survive a checkpoint
    ld2 = StreamingLoader(cfg)
    ld2.load_state_dict(ld.state_dict())
    assert ld2.skip_counts() == ld.skip_counts()


def test_corrupt_tar_region_counted_and_unreadable_shard_named(tmp_path):
    pattern = write_shards(tmp_path, "c", n=12, per_shard=6)
    paths = expand_shards(pattern)
    header = int(index_shard(paths[0]).spans[2][0, 0]) - 512  # tar header of sample 2's first member
    data = bytearray(open(paths[0], "rb").read())
    data[header : header + 64] = b"\xff" * 64
    open(paths[0], "wb").write(bytes(data))
    ld = StreamingLoader(cfg_for(pattern, num_workers=0))
    keys = [k for b in ld for k in b["__key__"]]
    counts = ld.skip_counts()
    # the damaged sample lost a member: the tar error and the incomplete sample are both counted
    assert counts == {"corrupt_tar": 1, "missing_json": 1}
    assert len(keys) == 11 and "c00002" not in keys
    with open(paths[1], "wb") as f:
        f.write(b"this is not a tar file" * 100)
    with pytest.raises(ShardError, match=paths[1].replace(".", r"\.")):
        StreamingLoader(cfg_for(pattern, num_workers=0))


def test_missing_pattern_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.sources.0.shards: 2 of the 2 shards of .* do not exist"):
        StreamingLoader(cfg_for(str(tmp_path / "none-{0..1}.tar")))


def test_epoch_mode_rejects_fractional_weight():
    with pytest.raises(ConfigError, match=r"sources\.0\.weight: epoch mode"):
        from_dict(DataConfig, {"sources": [{"shards": "a.tar", "weight": 1.5}]}, "x.yaml")


def test_codes_are_decoded(tmp_path):
    with ShardWriter(str(tmp_path / "k-%06d.tar")) as w:
        for i in range(4):
            codes = np.full((2, 2, 3), i, dtype=np.int16)
            w.write(make_sample(f"k{i}", _image(i), {"task": "reconstruct"}, codes=codes))
    batch = next(iter(StreamingLoader(cfg_for(str(tmp_path / "k-000000.tar"), batch_size=4, num_workers=0,
                                              shuffle_buffer=0))))
    assert batch["codes"].shape == (4, 2, 2, 3) and batch["codes"].dtype == torch.int64
    assert [int(c[0, 0, 0]) for c in batch["codes"]] == [0, 1, 2, 3]
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == torch.uint8
    x = normalize(batch["image"])
    assert x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_loader_reads_png_bytes_as_written(tmp_path):
    pattern = write_shards(tmp_path, "p", n=3, per_shard=3)
    cfg = cfg_for(pattern, num_workers=0, shuffle_buffer=0, image=ImageConfig(resolution=24))
    batch = next(iter(StreamingLoader(cfg, map_fn=lambda raw, ctx: raw, collate_fn=lambda xs: xs)))
    assert Image.open(io.BytesIO(batch[0]["png"])).size == (32, 24)


def test_iterating_does_not_consume_the_global_torch_rng(three_shards):
    """A resumed run creates a DataLoader iterator mid-epoch; that must not shift model RNG streams."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for workers in (0, 2):
        next(iter(StreamingLoader(cfg_for(three_shards, num_workers=workers))))
    assert torch.equal(torch.rand(3), expected)

