"""Batches of encoded sequences (:mod:`llm.conversation`): right-padded collation, and a batch cut into its
generation and understanding rows (each forwarded on its own, merged by :meth:`llm.model.UnifiedModel.merge_parts`)."""

from __future__ import annotations

import numpy as np
import torch

from llm.conversation import GEN, IGNORE, UND


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


def image_role(kind: np.ndarray) -> int:
    """GEN when a sample's image is generated, else UND (its image is read)."""
    return GEN if bool((kind == GEN).any()) else UND


def pack_sequences(samples: list[dict], pad_id: int, max_tokens: int = 0, split_tasks: bool = False) -> dict:
    """Several samples per row, each attending only to itself: the keys of :func:`collate_sequences` plus
    ``segment`` (B, T) (1, 2, ... per sample of a row, 0 on padding), ``position`` (B, T) restarting at 0 in every
    sample (or its turn blocks' positions), ``block`` (B, T) and ``image_role`` (n,) per sample; codes / image
    and ``__key__`` in the row-major order of the samples, as the model fills image slots.

    Rows are filled first-fit in sample order up to ``max_tokens`` (0: the longest sample). ``split_tasks``:
    generation and understanding samples are packed into separate rows (``task_parts`` then splits them)."""
    cap = max(max_tokens, max(len(s["input_ids"]) for s in samples))
    groups = ([[s for s in samples if image_role(s["kind"]) == GEN], [s for s in samples if image_role(s["kind"]) != GEN]]
              if split_tasks else [samples])
    rows: list[list[dict]] = []
    for group in groups:
        mine: list[list[dict]] = []
        used: list[int] = []
        for s in group:
            n = len(s["input_ids"])
            slot = next((i for i, u in enumerate(used) if u + n <= cap), None)
            if slot is None:
                mine.append([s])
                used.append(n)
            else:
                mine[slot].append(s)
                used[slot] += n
        rows += mine
    T = max(sum(len(s["input_ids"]) for s in row) for row in rows)

    def row_of(value: int, per_sample) -> torch.Tensor:
        cat = [np.concatenate([per_sample(j, s) for j, s in enumerate(row)]) for row in rows]
        return torch.from_numpy(np.stack([np.pad(c, (0, T - len(c)), constant_values=value) for c in cat]).astype(np.int64))

    order = [s for row in rows for s in row]
    out = {"__key__": [s["__key__"] for s in order],
           "input_ids": row_of(pad_id, lambda j, s: s["input_ids"]),
           "targets": row_of(IGNORE, lambda j, s: s["targets"]),
           "kind": row_of(0, lambda j, s: s["kind"]),
           "segment": row_of(0, lambda j, s: np.full(len(s["input_ids"]), j + 1)),
           "block": row_of(0, lambda j, s: s.get("block", np.zeros(len(s["input_ids"]), np.int64))),
           "position": row_of(0, lambda j, s: s.get("position", np.arange(len(s["input_ids"])))),
           "image_role": torch.tensor([image_role(s["kind"]) for s in order], dtype=torch.long)}
    out["attention_mask"] = (out["segment"] > 0).long()
    for key in ("codes", "image"):
        if key in order[0]:
            out[key] = torch.from_numpy(np.stack([s[key] for s in order]))
    return out


SEQUENCE_KEYS = ("input_ids", "targets", "kind", "attention_mask", "block", "position", "segment")


def task_parts(batch: dict) -> list[dict]:
    """A collated batch -> its generation rows and its understanding rows as two batches (absent ones left
    out), each cut to its own longest sequence (the batch is right-padded)."""
    gen = (batch["kind"] == GEN).any(1)  # (B,)
    parts = []
    for rows in (gen, ~gen):
        if not rows.any():
            continue
        T = int(batch["attention_mask"][rows].sum(1).max())
        samples = rows
        if "image_role" in batch:  # packed (one task a row): codes and keys are per sample, in row-major order
            samples = (batch["image_role"] == GEN) if bool(gen[rows].all()) else (batch["image_role"] != GEN)
        part = {"__key__": [k for k, r in zip(batch["__key__"], samples.tolist()) if r]}
        for key, v in batch.items():
            if isinstance(v, torch.Tensor):
                part[key] = v[rows][:, :T] if key in SEQUENCE_KEYS else v[samples]
        parts.append(part)
    return parts
