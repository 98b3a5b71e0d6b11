"""What is said about a shapes-world scene: the GenEval spec it is drawn from (:func:`sample_geneval_spec`), its
caption, MME-style yes/no pairs and LLaVA-style conversations."""

from __future__ import annotations

from typing import Any

import numpy as np

from data.shapes_config import (
    MME_SUFFIX,
    NUMBERS,
    OPPOSITE,
    PLURALS,
    RELATIONS,
    SHAPES,
    TAGS,
    ShapesConfig,
    article,
)
from data.shapes_geometry import robust_relations

# ----------------------------------------------------------------------------- GenEval specs


def sample_geneval_spec(cfg: ShapesConfig, rng: np.random.Generator, tag: str | None = None) -> tuple[dict, list]:
    """A GenEval-format metadata dict and the ``[shape, colour]`` list of the objects it implies.

    Templates, clause keys and key order mirror prompts/evaluation_metadata.jsonl of GenEval; the
    relation of a position prompt is carried by the second include clause (``[rel, 0]``).
    """
    if tag is None:
        tags = [t for t in TAGS if cfg.tag_weights.get(t, 0) > 0]
        w = np.array([cfg.tag_weights[t] for t in tags], float)
        tag = tags[rng.choice(len(tags), p=w / w.sum())]
    shapes, colors = list(cfg.shapes), list(cfg.colors)

    def pick(seq, k=1):
        return [seq[j] for j in rng.choice(len(seq), size=k, replace=False)]

    def color():
        return colors[rng.integers(len(colors))]

    meta: dict[str, Any] = {"tag": tag}
    if tag == "single_object":
        (a,) = pick(shapes)
        meta["include"] = [{"class": a, "count": 1}]
        prompt, objs = f"a photo of {article(a)} {a}", [[a, color()]]
    elif tag == "two_object":
        a, b = pick(shapes, 2)
        meta["include"] = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        prompt, objs = f"a photo of {article(a)} {a} and {article(b)} {b}", [[a, color()], [b, color()]]
    elif tag == "counting":
        (a,) = pick(shapes)
        n = int(rng.integers(2, cfg.max_objects + 1))
        meta["include"] = [{"class": a, "count": n}]
        meta["exclude"] = [{"class": a, "count": n + 1}]
        prompt, objs = f"a photo of {NUMBERS[n]} {PLURALS[a]}", [[a, color()] for _ in range(n)]
    elif tag == "colors":
        (a,), c = pick(shapes), color()
        meta["include"] = [{"class": a, "count": 1, "color": c}]
        prompt, objs = f"a photo of {article(c)} {c} {a}", [[a, c]]
    elif tag == "position":
        a, b = pick(shapes, 2)
        rel = RELATIONS[rng.integers(4)]
        meta["include"] = [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [rel, 0]}]
        prompt, objs = f"a photo of {article(b)} {b} {rel} {article(a)} {a}", [[a, color()], [b, color()]]
    elif tag == "color_attr":
        a, b = pick(shapes, 2)
        ca, cb = pick(colors, 2)
        meta["include"] = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        prompt, objs = f"a photo of {article(ca)} {ca} {a} and {article(cb)} {cb} {b}", [[a, ca], [b, cb]]
    else:
        raise ValueError(f"unknown GenEval tag {tag!r}")
    meta["prompt"] = prompt
    return meta, objs


# ----------------------------------------------------------------------------- text


def location(obj: dict, side: int) -> str:
    """Coarse 3x3-grid location phrase of an object's centre ("at the top left", "in the center")."""
    col, row = (min(int(v / side * 3), 2) for v in obj["center"])
    r, c = ("top", "middle", "bottom")[row], ("left", "center", "right")[col]
    if (row, col) == (1, 1):
        return "in the center"
    if row == 1:
        return f"on the {c}"
    return f"at the {r}" if col == 1 else f"at the {r} {c}"


def describe(objects: list[dict], i: int) -> str | None:
    """A unique referring phrase for object ``i`` ("the circle", "the red circle"), or None."""
    o = objects[i]
    if sum(p["shape"] == o["shape"] for p in objects) == 1:
        return f"the {o['shape']}"
    if sum((p["shape"], p["color"]) == (o["shape"], o["color"]) for p in objects) == 1:
        return f"the {o['color']} {o['shape']}"
    return None


def _rel_phrase(rel: str) -> str:
    return {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)


def _count_phrase(shape: str, k: int) -> str:
    return f"{article(shape)} {shape}" if k == 1 else f"{NUMBERS[k]} {PLURALS[shape]}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def caption(cfg: ShapesConfig, objects: list[dict]) -> str:
    """Complete description: object count, per-class counts, every object's colour/shape/location.

    Two-object scenes add their robust GenEval relation ("The red circle is left of the square.").
    """
    order = sorted(range(len(objects)), key=lambda i: (objects[i]["center"][1] // (cfg.image_size / 3),
                                                         objects[i]["center"][0]))
    items = [f"{article(objects[i]['color'])} {objects[i]['color']} {objects[i]['shape']} "
             f"{location(objects[i], cfg.image_size)}" for i in order]
    n = len(objects)
    if n == 1:
        return f"One object: {items[0]}."
    counts = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    summary = _join([_count_phrase(s, k) for s, k in counts.items() if k])
    text = f"{_cap(NUMBERS[n])} objects: {summary}. {_cap(_join(items))}."
    d0, d1 = (describe(objects, 0), describe(objects, 1)) if n == 2 else (None, None)
    if d0 and d1:
        rels = robust_relations(objects[0]["bbox"], objects[1]["bbox"], cfg.position_margin)
        if rels:
            text += f" {_cap(d0)} is {' and '.join(sorted(rels))} {d1}."
    return text


def _pair(yes: str, no: str) -> list[dict]:
    return [{"question": yes + MME_SUFFIX, "answer": "Yes"}, {"question": no + MME_SUFFIX, "answer": "No"}]


def mme_pairs(cfg: ShapesConfig, objects: list[dict], rng: np.random.Generator) -> dict[str, list[dict]]:
    """MME-style yes/no pairs per subtask (existence, count, position, color); a subtask is left out
    when no unambiguous pair exists (colour needs a uniquely named object, position a robust relation)."""
    out: dict[str, list[dict]] = {}
    present = {(o["color"], o["shape"]) for o in objects}
    # existence: a present (colour, shape) vs an absent one, preferring near misses
    absent = [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    if absent:
        yc, ys = sorted(present)[rng.integers(len(present))]
        pool = near or absent
        nc, ns = pool[rng.integers(len(pool))]
        out["existence"] = _pair(f"Is there {article(yc)} {yc} {ys} in the image?",
                                 f"Is there {article(nc)} {nc} {ns} in the image?")
    # count: the true count of a present class vs one off
    shapes = sorted({o["shape"] for o in objects})
    s = shapes[rng.integers(len(shapes))]
    k = sum(o["shape"] == s for o in objects)
    wrong = k + 1 if k == 1 or rng.random() < 0.5 else k - 1

    def count_q(j: int) -> str:
        return f"Is there exactly one {s} in the image?" if j == 1 else \
            f"Are there exactly {NUMBERS[j]} {PLURALS[s]} in the image?"

    out["count"] = _pair(count_q(k), count_q(wrong))
    # position: an ordered pair of uniquely named objects with a robust relation, vs its opposite
    cands = [(i, j, sorted(robust_relations(objects[i]["bbox"], objects[j]["bbox"], cfg.position_margin)))
             for i in range(len(objects)) for j in range(len(objects))
             if i != j and describe(objects, i) and describe(objects, j)]
    cands = [c for c in cands if c[2]]
    if cands:
        i, j, rels = cands[rng.integers(len(cands))]
        rel = rels[rng.integers(len(rels))]
        di, dj = describe(objects, i), describe(objects, j)
        out["position"] = _pair(f"Is {di} {_rel_phrase(rel)} {dj}?", f"Is {di} {_rel_phrase(OPPOSITE[rel])} {dj}?")
    # color: an object whose shape is unique in the image, its colour vs another (preferably present) one
    unique = [i for i in range(len(objects)) if sum(o["shape"] == objects[i]["shape"] for o in objects) == 1]
    if unique and len(cfg.colors) > 1:
        o = objects[unique[rng.integers(len(unique))]]
        others = [c for c in cfg.colors if c != o["color"]]
        hard = [c for c in others if any(p["color"] == c for p in objects)]
        pool = hard if hard and rng.random() < 0.5 else others
        out["color"] = _pair(f"Is the {o['shape']} {o['color']}?", f"Is the {o['shape']} {pool[rng.integers(len(pool))]}?")
    return out


def asked(cfg: ShapesConfig, pair: list, rng: np.random.Generator) -> list:
    """The questions of a yes/no pair a conversation asks: both, or one drawn at random (``qa_pairs``)."""
    return pair if cfg.qa_pairs == "both" else [pair[rng.integers(len(pair))]]


def shape_questions(cfg: ShapesConfig, objects: list[dict], rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, answer) pairs only the shapes answer: "What shape is the <colour> object?" for every colour
    that one object has, and an existence pair about one object, its shape vs a shape no object of that
    colour has (asked both, or one of them with ``qa_pairs: one``)."""
    out = []
    for o in objects:
        if sum(p["color"] == o["color"] for p in objects) == 1:
            out.append((f"What shape is the {o['color']} object?", f"{o['shape'].capitalize()}."))
    present = {(o["color"], o["shape"]) for o in objects}
    cands = [(o, s) for o in objects for s in cfg.shapes if (o["color"], s) not in present]
    if cands:
        o, s = cands[rng.integers(len(cands))]
        c = o["color"]
        pair = [(f"Is there {article(c)} {c} {o['shape']} in the image?{MME_SUFFIX}", "Yes"),
                (f"Is there {article(c)} {c} {s} in the image?{MME_SUFFIX}", "No")]
        out += asked(cfg, pair, rng)
    return out


def conversations(cfg: ShapesConfig, objects: list[dict], text: str, mme: dict, rng: np.random.Generator) -> list[dict]:
    """LLaVA turns: describe (answered by the caption), then ``qa_turns`` questions from a pool of
    open count/colour questions, the record's MME yes/no questions (one or both of each pair, ``qa_pairs``)
    and, with ``shape_questions``, the questions only the shapes answer (:func:`shape_questions`)."""
    pool = []
    for s in sorted({o["shape"] for o in objects}):
        k = sum(o["shape"] == s for o in objects)
        pool.append((f"How many {PLURALS[s]} are there?", f"{NUMBERS[k].capitalize()}."))
    for i, o in enumerate(objects):
        if describe(objects, i) == f"the {o['shape']}":
            pool.append((f"What color is the {o['shape']}?", f"{o['color'].capitalize()}."))
    for pair in mme.values():
        pool += [(q["question"], q["answer"]) for q in asked(cfg, pair, rng)]
    if cfg.shape_questions:  # none that is one of the MME pairs (asked above, or left out with qa_pairs: one)
        mme_questions = {q["question"] for pair in mme.values() for q in pair}
        pool += [qa for qa in shape_questions(cfg, objects, rng) if qa[0] not in mme_questions]
    turns = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": text}]
    for j in rng.permutation(len(pool))[: cfg.qa_turns]:
        turns += [{"from": "human", "value": pool[j][0]}, {"from": "gpt", "value": pool[j][1]}]
    return turns
