"""Shapes-world GenEval scoring with a chance-level control.

Each generated image is scored by :mod:`eval.shapes_scorer` (GenEval's rules) against its own prompt
(``matched``) and against a different prompt of the same tag (``shuffled``: a seeded derangement within
the tag), so a score can be read against what the same images get by chance.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def shuffled_partner(specs: list[dict], seed: int = 0) -> list[int]:
    """For each spec, the index of another spec with the same tag (itself only when its tag is alone)."""
    rng = np.random.default_rng(seed)
    by_tag: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(specs):
        by_tag[s["tag"]].append(i)
    partner = list(range(len(specs)))
    for idx in by_tag.values():
        if len(idx) < 2:
            continue
        perm = rng.permutation(len(idx))
        shift = perm[(np.arange(len(idx)) + 1) % len(idx)]  # a cycle through a random order: no fixed point
        for a, b in zip(perm, shift):
            partner[idx[a]] = idx[b]
    return partner


def score_generations(images: list[np.ndarray], specs: list[dict], seed: int = 0,
                      only: list[int] | None = None) -> dict:
    """Verdicts ``matched`` / ``shuffled`` (lists of bool) for uint8 images of ``specs`` (GenEval metadata);
    with ``only``, image i is of ``specs[only[i]]`` (one rank's share; partners still come from all specs)."""
    from eval.shapes_scorer import score

    partner = shuffled_partner(specs, seed)
    idx = list(range(len(specs))) if only is None else list(only)
    matched = [bool(score(img, specs[i])[0]) for img, i in zip(images, idx)]
    shuffled = [bool(score(img, specs[partner[i]])[0]) for img, i in zip(images, idx)]
    return {"matched": matched, "shuffled": shuffled, "tags": [specs[i]["tag"] for i in idx]}


def summarize(tags: list[str], matched: list[bool], shuffled: list[bool]) -> dict[str, float]:
    """GenEval's summary: per-tag accuracy and the unweighted mean over tags, for matched and shuffled."""
    out: dict[str, float] = {}
    for name, verdicts in (("matched", matched), ("shuffled", shuffled)):
        per_tag = {t: [v for tt, v in zip(tags, verdicts) if tt == t] for t in dict.fromkeys(tags)}
        scores = {t: float(np.mean(v)) for t, v in per_tag.items() if v}
        out.update({f"{name}/{t}": s for t, s in scores.items()})
        out[f"{name}/overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return out
