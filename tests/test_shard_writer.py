"""Shard writer: byte limits that count every tar block."""

from __future__ import annotations

import numpy as np
from PIL import Image

from data.schema import make_sample
from data.shard_writer import ShardWriter
from data.tar_index import index_shard


def test_shard_bytes_limit_counts_long_name_headers(tmp_path):
    """Keys over 100 characters need GNU long-name blocks; the byte limit must count them."""
    key = "k" * 60 + "/" + "x" * 60
    with ShardWriter(str(tmp_path / "l-%06d.tar"), max_samples=0, max_bytes=20000) as w:
        for i in range(30):
            w.write(make_sample(f"{key}{i:03d}", Image.fromarray(np.full((8, 8, 3), i, np.uint8)), {"caption": "c"}))
    for p in w.written:
        idx = index_shard(p)
        end = max(int((s[:, 0] + s[:, 1]).max()) for s in idx.spans)
        assert end <= 20000  # member bytes within the limit (the file adds only end-of-archive padding)
    assert sum(len(index_shard(p)) for p in w.written) == 30
