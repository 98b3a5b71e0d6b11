"""The text of a set of shards, for training a text tokenizer (:func:`llm.text_tokenizer.train_text_tokenizer`)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator

from data.schema import IMAGE_TOKEN
from data.tar_index import iter_shard


def corpus(shards: Iterable[str], max_records: int = 0) -> Iterator[str]:
    """Text of the shards' json members: caption, prompt and every conversation turn (``<image>`` removed)."""

    def records() -> Iterator[dict]:
        for shard in shards:
            for sample in iter_shard(shard):
                if "json" in sample:
                    try:
                        yield json.loads(sample["json"])
                    except ValueError:
                        continue  # the loader counts bad json; the corpus only needs the good ones

    for rec in itertools.islice(records(), max_records or None):
        for key in ("caption", "prompt"):
            if isinstance(rec.get(key), str):
                yield rec[key]
        for turn in rec.get("conversations", []) or []:
            if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                yield turn["value"].replace(IMAGE_TOKEN, "").strip()
