"""Length-grouped micro-batches with exact resume.

The loader delivers ``group`` micro-batches' worth of samples at once (a list); they are sorted by length,
cut into micro-batches of similar length (so little padding, and LLaVA-style mostly one modality per
micro-batch) and yielded in a seeded random order. The state is the loader's position *before* the
current group plus how many of its micro-batches were consumed, so a resumed run re-reads that group
and continues with exactly the next micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


class LengthGroupedBatches:
    """Args: loader (a StreamingLoader whose batches are lists of samples, ``micro_batch * group`` long);
    micro_batch; length (sample -> int); collate (list of samples -> batch); seed."""

    def __init__(self, loader, micro_batch: int, length: Callable[[Any], int], collate: Callable[[list], Any],
                 seed: int = 0):
        self.loader, self.micro_batch, self.length, self.collate, self.seed = loader, micro_batch, length, collate, seed
        self._snapshot = loader.state_dict()
        self._index = 0

    def __iter__(self) -> Iterator[Any]:
        while True:
            for group in self.loader:
                done, self._index = self._index, 0
                order = sorted(range(len(group)), key=lambda i: -self.length(group[i]))
                chunks = [order[i: i + self.micro_batch] for i in range(0, len(order), self.micro_batch)]
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

    def state_dict(self) -> dict:
        return {"loader": self._snapshot, "index": self._index}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self._snapshot, self._index = state["loader"], int(state["index"])
