"""Length-grouped micro-batches with exact resume.

The loader delivers ``group`` micro-batches' worth of samples at once (a list); they are sorted by length,
cut into micro-batches of similar length (so little padding, and LLaVA-style mostly one modality per
micro-batch) and yielded in a seeded random order. With ``stratum`` (e.g. the task of a sample), each
stratum is sorted by length on its own and dealt across the micro-batches in contiguous runs, so every
micro-batch keeps the group's mix of strata and, within a stratum, samples of similar length. The state is the loader's position *before* the
current group plus how many of its micro-batches were consumed, so a resumed run re-reads that group
and continues with exactly the next micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np


class LengthGroupedBatches:
    """Args: loader (a StreamingLoader whose batches are lists of samples, ``micro_batch * group`` long);
    micro_batch; length (sample -> int); collate (list of samples -> batch); seed; stratum (sample -> key,
    optional: keep every micro-batch mixed across keys)."""

    def __init__(self, loader, micro_batch: int, length: Callable[[Any], int], collate: Callable[[list], Any],
                 seed: int = 0, stratum: Callable[[Any], Hashable] | None = None):
        self.loader, self.micro_batch, self.length, self.collate, self.seed = loader, micro_batch, length, collate, seed
        self.stratum = stratum
        self._snapshot = loader.state_dict()
        self._index = 0

    def __iter__(self) -> Iterator[Any]:
        while True:
            for group in self.loader:
                done, self._index = self._index, 0
                chunks = self._chunks(group)
                rng = np.random.default_rng([self.seed, self._snapshot["epoch"], *self._snapshot["consumed"]])
                chunks = [chunks[i] for i in rng.permutation(len(chunks))]
                for j, chunk in enumerate(chunks):
                    if j < done:
                        continue  # consumed before the checkpoint this run resumed from
                    self._index = j + 1
                    if j + 1 == len(chunks):  # the group is finished: the next state starts after it
                        self._snapshot, self._index = self.loader.state_dict(), 0
                    yield self.collate([group[i] for i in chunk])
            # epoch boundary: the loader advanced its epoch after its last group
            self._snapshot, self._index = self.loader.state_dict(), 0

    def _chunks(self, group: list) -> list[list[int]]:
        strata = [self.stratum(x) for x in group] if self.stratum is not None else None
        return length_chunks([self.length(x) for x in group], self.micro_batch, strata)

    def state_dict(self) -> dict:
        return {"loader": self._snapshot, "index": self._index}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self._snapshot, self._index = state["loader"], int(state["index"])


def length_chunks(lengths: list[int], micro_batch: int, strata: list[Hashable] | None = None) -> list[list[int]]:
    """Indices of each micro-batch, longest first. With ``strata`` (one key per sample), every stratum is
    sorted on its own and dealt in contiguous runs across the micro-batches, so each keeps the mix."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if strata is None:
        return [order[i: i + micro_batch] for i in range(0, len(order), micro_batch)]
    n = -(-len(lengths) // micro_batch)  # micro-batches
    groups: dict[Hashable, list[int]] = {}
    for i in order:
        groups.setdefault(strata[i], []).append(i)
    chunks: list[list[int]] = [[] for _ in range(n)]
    for members in groups.values():
        for j, part in enumerate(np.array_split(np.asarray(members, dtype=np.int64), n)):
            chunks[j] += part.tolist()
    return [c for c in chunks if c]
