"""Stage-2 rows: one sample per row (right-padded) vs packed rows (``mix.pack``), on the same samples.

    .venv/bin/python benchmarks/packing.py [--batch 16] [--steps 12] [--threads 2] [--device cpu|cuda]
        [--out benchmarks/results/packing.json]

The tiny unified model of ``benchmarks/train_step.py`` trains on synthetic micro-batches of ``--batch`` samples
whose text lengths vary as real captions and answers do: understanding samples ask and answer 5-60 words after
their 64 image slots, generation samples prompt with 3-40 words before 64 positions. The same samples are
collated one per row (``llm.batch.collate_sequences``) and packed (``llm.batch.pack_sequences``, rows as long as
two of the longest sample). Reported: the padding fraction, real tokens/s over the timed steps (median step), and
the ratio packed / unpacked; the two runs' last losses agree (the same samples and gradients: the packing
tests assert it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch
from train_step import WORDS, build, run  # benchmarks/ is on the path of these scripts

from llm.batch import collate_sequences, pack_sequences
from llm.conversation import GEN, UND, ConversationEncoder


def samples(text, model, batch: int, n: int) -> list[list[dict]]:
    enc = ConversationEncoder(text, model.image_positions, 512)
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        rows = []
        for i in range(batch):
            words = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
            conv = ([{"from": "human", "value": "<image>\n" + words(int(rng.integers(5, 30)))},
                     {"from": "gpt", "value": words(int(rng.integers(1, 30)))}] if i % 2
                    else [{"from": "human", "value": words(int(rng.integers(3, 40)))}, {"from": "gpt", "value": "<image>"}])
            e = enc.encode(conv)
            rows.append({"__key__": str(i), "input_ids": e.input_ids, "targets": e.targets, "kind": e.kind,
                         "codes": rng.integers(0, 128, (8, 8, 8))})
        out.append(rows)
    return out


def inputs(evo, b: dict, device: str) -> dict:
    codes = b["codes"].to(device)
    if "image_role" in b:
        und, gen = b["image_role"] == UND, b["image_role"] == GEN
    else:
        und, gen = (b["kind"] == UND).any(1), (b["kind"] == GEN).any(1)
    with torch.no_grad():
        feats = evo.semantic_features(codes[und])
    out = {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device),
           "targets": b["targets"].to(device), "kind": b["kind"].to(device), "und_feats": feats,
           "gen_codes": codes[gen][..., :4].flatten(1, 2)}
    if "segment" in b:
        out.update(segment=b["segment"].to(device), position_ids=b["position"].to(device), block=b["block"].to(device))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="benchmarks/results/packing.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    evo, text, model = build(args.device)
    model.train()
    pad = model.dims.token_ids["pad"]
    raw = samples(text, model, args.batch, args.steps)
    results = {}
    for name, collate in (("unpacked", lambda s: collate_sequences(s, pad)),
                          ("packed", lambda s: pack_sequences(s, pad, 2 * max(len(x["input_ids"]) for x in s)))):
        batches = [collate(s) for s in raw]
        real = statistics.mean(float(b["attention_mask"].sum()) for b in batches)
        padding = 1 - statistics.mean(float(b["attention_mask"].float().mean()) for b in batches)
        rows = statistics.mean(b["input_ids"].shape[0] for b in batches)
        times, last = run(model, [inputs(evo, b, args.device) for b in batches], False, args.device, warmup=2)
        step = statistics.median(times)
        results[name] = {"rows": rows, "padding_fraction": padding, "median_step_s": step,
                         "tokens_per_s": real / step, "last_loss": last}
        print(f"{name:9s} rows {rows:5.1f}  padding {padding:6.1%}  step {step * 1e3:7.1f} ms  "
              f"{real / step:8.0f} real tokens/s  last loss {last:.6f}")
    ratio = results["packed"]["tokens_per_s"] / results["unpacked"]["tokens_per_s"]
    print(f"packed / unpacked tokens/s: {ratio:.2f}x")
    record = {"benchmark": "packing", "batch": args.batch, "steps": args.steps, "threads": args.threads,
              "device": args.device, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "results": results, "speedup": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
