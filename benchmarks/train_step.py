"""Stage-2 training step: fp32 vs ``train.precision: bf16-autocast`` on the tiny unified model.

    .venv/bin/python benchmarks/train_step.py [--batch 16] [--steps 20] [--threads 1] [--device cpu|cuda]
        [--out benchmarks/results/train_step.json]

Both variants train the same random-init stage-2 tiny model (LLM hidden 128 x 4 layers, depth transformer
2 x 128, a 64-position 8x8 grid, L_pix 4, 128 codes) with AdamW on the same synthetic batches: half
understanding (64 image slots + 60 text tokens), half generation (20 prompt tokens + 64 positions). The
baseline is fp32; bf16-autocast keeps fp32 weights and optimizer and runs the forward under
torch.autocast(bfloat16). Reported: median seconds per step, samples/s, tokens/s and the speed-up, plus the
loss after the timed steps of each (the same batches, so their losses should stay close).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from llm.batch import collate_sequences
from llm.config import DepthConfig, LLMConfig, UnifiedConfig
from llm.conversation import ConversationEncoder
from llm.model import build_unified
from llm.text_tokenizer import train_text_tokenizer
from tokenizer.config import PixelDecoderConfig, QuantizerConfig, TokenizerConfig, VisionTowerConfig
from tokenizer.model import EvoTokenizer

WORDS = "a photo of red green blue circle square triangle left right above below two three the is yes no".split()


def build(device: str):
    tower = VisionTowerConfig(image_size=64, patch_size=8, hidden_size=128, num_layers=2, num_heads=4,
                              intermediate_size=512)
    tok_cfg = TokenizerConfig(encoder=tower, teacher=tower, quantizer=QuantizerConfig(codebook_size=128, depth_sem=8),
                              pixel_decoder=PixelDecoderConfig(channels=16, z_channels=32, channel_mult=(1, 1, 2, 2)))
    torch.manual_seed(0)
    evo = EvoTokenizer(tok_cfg, with_teacher=False).eval()
    rng = np.random.default_rng(0)
    text = train_text_tokenizer([" ".join(rng.choice(WORDS, 12)) for _ in range(200)], 512)
    cfg = UnifiedConfig(llm=LLMConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512),
                        depth=DepthConfig(layers=2, width=128, heads=4), freeze_llm=False, input_norm=True,
                        image_pos_embed=True)
    return evo.to(device), text, build_unified(cfg, text, [], evo).to(device)


def batches(evo, text, model, batch: int, n: int, device: str) -> list[dict]:
    enc = ConversationEncoder(text, model.image_positions, 512)
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        samples = []
        for i in range(batch):
            words = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
            conv = ([{"from": "human", "value": "<image>\n" + words(30)}, {"from": "gpt", "value": words(30)}] if i % 2
                    else [{"from": "human", "value": words(20)}, {"from": "gpt", "value": "<image>"}])
            e = enc.encode(conv)
            samples.append({"__key__": str(i), "input_ids": e.input_ids, "targets": e.targets, "kind": e.kind,
                            "codes": rng.integers(0, 128, (8, 8, 8))})
        b = collate_sequences(samples, model.dims.token_ids["pad"])
        codes = b["codes"].to(device)
        und, gen = (b["kind"] == 1).any(1), (b["kind"] == 2).any(1)
        with torch.no_grad():
            feats = evo.semantic_features(codes[und])
        out.append({"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device),
                    "targets": b["targets"].to(device), "kind": b["kind"].to(device), "und_feats": feats,
                    "gen_codes": codes[gen][..., :4].flatten(1, 2)})
    return out


def run(model, data: list[dict], autocast: bool, device: str, warmup: int = 3) -> tuple[list[float], float]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    times, loss = [], float("nan")
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        with ctx():
            out = model(**b)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        loss = float(out["loss"].detach())
    model.load_state_dict(state)  # the next variant starts from the same weights
    return times, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    evo, text, model = build(args.device)
    data = batches(evo, text, model, args.batch, args.steps + 3, args.device)
    tokens = float(np.mean([int(b["attention_mask"].sum()) for b in data]))
    res = {}
    for name, ac in (("fp32", False), ("bf16-autocast", True)):
        times, loss = run(model, data, ac, args.device)
        med = statistics.median(times)
        res[name] = {"step_s": med, "samples_per_s": args.batch / med, "tokens_per_s": tokens / med, "final_loss": loss}
        print(f"{name:14s} {med * 1000:7.1f} ms/step  {args.batch / med:6.1f} samples/s  {tokens / med:7.0f} tokens/s  "
              f"loss {loss:.3f}")
    ratio = res["fp32"]["step_s"] / res["bf16-autocast"]["step_s"]
    print(f"bf16-autocast speed-up over fp32: {ratio:.2f}x")
    out = {"benchmark": "train_step", "batch": args.batch, "threads": args.threads, "device": args.device,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "results": res, "speedup": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
