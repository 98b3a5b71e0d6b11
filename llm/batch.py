"""Batches of encoded sequences (:mod:`llm.conversation`): right-padded collation, and a batch cut into its
generation and understanding rows (each forwarded on its own, merged by :meth:`llm.model.UnifiedModel.merge_parts`)."""

from __future__ import annotations

import numpy as np
import torch

from llm.conversation import GEN, IGNORE


def collate_sequences(samples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest: input_ids / targets / kind / attention_mask (B, T), block / position (B, T) when
    some sample is packed in turn blocks; codes or image stacked."""
    T = max(len(s["input_ids"]) for s in samples)

    def pad(key: str, value: int, dtype) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.pad(s[key], (0, T - len(s[key])), constant_values=value)
                                          for s in samples]).astype(dtype))

    out = {"__key__": [s["__key__"] for s in samples], "input_ids": pad("input_ids", pad_id, np.int64),
           "targets": pad("targets", IGNORE, np.int64), "kind": pad("kind", 0, np.int64),
           "attention_mask": torch.from_numpy(np.stack([np.arange(T) < len(s["input_ids"]) for s in samples]).astype(np.int64))}
    if any("block" in s for s in samples):  # packed turn blocks (plain rows: one block 0, positions 0..T-1)
        samples = [s if "block" in s else {**s, "block": np.zeros(len(s["input_ids"]), np.int64),
                                           "position": np.arange(len(s["input_ids"]))} for s in samples]
        out.update(block=pad("block", 0, np.int64), position=pad("position", 0, np.int64))
    for key in ("codes", "image"):
        if key in samples[0]:
            out[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
    return out


SEQUENCE_KEYS = ("input_ids", "targets", "kind", "attention_mask", "block", "position")


def task_parts(batch: dict) -> list[dict]:
    """A collated batch -> its generation rows and its understanding rows as two batches (absent ones left
    out), each cut to its own longest sequence (the batch is right-padded)."""
    gen = (batch["kind"] == GEN).any(1)  # (B,)
    parts = []
    for rows in (gen, ~gen):
        if not rows.any():
            continue
        T = int(batch["attention_mask"][rows].sum(1).max())
        part = {"__key__": [k for k, r in zip(batch["__key__"], rows.tolist()) if r]}
        for key, v in batch.items():
            if isinstance(v, torch.Tensor):
                part[key] = v[rows][:, :T] if key in SEQUENCE_KEYS else v[rows]
        parts.append(part)
    return parts
