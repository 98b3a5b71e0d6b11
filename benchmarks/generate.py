"""Image sampling: KV-cached (LLM across positions, depth transformer across depths) vs uncached.

    .venv/bin/python benchmarks/generate.py [--model tiny|1.5b] [--positions 256] [--batch 4] [--repeats 3]
        [--threads 1] [--device cpu|cuda] [--dtype fp32|bf16] [--out benchmarks/results/generate.json]

Both paths run the same random-init model with CFG (the batch is doubled), top-k/top-p and the same
per-sample seeds; the codes must be identical (checked, so the speed-up is for the same output).
Baseline: ``cache=False`` re-runs the whole LLM sequence at every position and the depth prefix at every
depth. ``tiny`` = the stage-2 tiny preset's LLM (hidden 128, 4 layers) and depth transformer (2 x 128);
``1.5b`` = a random-init Qwen2.5-1.5B-sized LLM (hidden 1536, 28 layers) with the reference depth
transformer (6 x 2560) - GPU only in practice. Reported: median wall seconds per batch and images/s.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from llm.config import DepthConfig, LLMConfig, SamplerConfig, UnifiedConfig
from llm.model import build_unified
from llm.text_tokenizer import train_text_tokenizer
from tokenizer.config import PixelDecoderConfig, QuantizerConfig, TokenizerConfig, VisionTowerConfig
from tokenizer.model import EvoTokenizer
from unimllm.stages.pipeline import UnifiedPipeline

MODELS = {
    "tiny": (LLMConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512),
             DepthConfig(layers=2, width=128, heads=4), 512),
    "1.5b": (LLMConfig(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960),
             DepthConfig(layers=6, width=2560, heads=40), 32768),
}


def build(name: str, positions: int, device: str, dtype: torch.dtype) -> UnifiedPipeline:
    llm, depth, K = MODELS[name]
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise SystemExit(f"--positions must be a square, got {positions}")
    tower = VisionTowerConfig(image_size=grid * 8, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                              intermediate_size=64)
    tok_cfg = TokenizerConfig(encoder=tower, teacher=tower, quantizer=QuantizerConfig(codebook_size=K, depth_sem=8),
                              pixel_decoder=PixelDecoderConfig(channels=16, z_channels=16, channel_mult=(1, 1, 2, 2)))
    torch.manual_seed(0)
    evo = EvoTokenizer(tok_cfg, with_teacher=False).eval()
    text = train_text_tokenizer(["a photo of a red circle and a blue square"] * 50, 300)
    cfg = UnifiedConfig(llm=llm, depth=depth, sampler=SamplerConfig(cfg_scale=3.0, top_k=min(900, K), top_p=0.96))
    model = build_unified(cfg, text, [], evo).to(device=device, dtype=dtype).eval()
    return UnifiedPipeline(model, evo.to(device), text)


def timed(pipe: UnifiedPipeline, prompts: list[str], cache: bool, repeats: int, device: str):
    times, codes = [], None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        codes = pipe.generate_codes(prompts, seed=0, batch=len(prompts), cache=cache)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--out", default="benchmarks/results/generate.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    pipe = build(a.model, a.positions, a.device, dtype)
    prompts = [f"a photo of {i + 1} red circles" for i in range(a.batch)]
    timed(pipe, prompts, True, 1, a.device)  # warm-up (allocator, kernels)
    t_cached, c_cached = timed(pipe, prompts, True, a.repeats, a.device)
    t_plain, c_plain = timed(pipe, prompts, False, max(1, a.repeats // 2), a.device)
    same = bool(torch.equal(c_cached, c_plain))
    res = {"model": a.model, "positions": a.positions, "batch": a.batch, "device": a.device, "dtype": a.dtype,
           "threads": a.threads, "cached_s": t_cached, "uncached_s": t_plain,
           "cached_images_per_s": a.batch / t_cached, "uncached_images_per_s": a.batch / t_plain,
           "speedup": t_plain / t_cached, "identical_codes": same,
           "machine": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None, "torch": torch.__version__}
    print(f"{a.model} {a.positions} positions, batch {a.batch} (CFG doubles it), {a.device} {a.dtype}: "
          f"cached {res['cached_images_per_s']:.2f} img/s, uncached {res['uncached_images_per_s']:.2f} img/s, "
          f"speed-up {res['speedup']:.1f}x, identical codes: {same}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    if not same:
        raise SystemExit("cached and uncached sampling disagree")


if __name__ == "__main__":
    main()
