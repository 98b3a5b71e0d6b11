"""What a run at the recipe's scale costs: shards, disk, CPU-hours to build, GPU-hours to encode and to train.

``unimllm plan`` prints the table (docs/data.md has the one for 13M images at 256 px). Every figure says where
it comes from:

- **measured**: shard building from ``benchmarks/results/build_shards.json`` (images/s per core and with every
  core, on the machine named there);
- **exact**: shard counts and the size of the codes (grid x L_sem x 2 bytes a sample, plus the tar and .npy
  headers);
- **assumed**: the size of a stored image (``--image_kb``);
- **estimate**: GPU-hours from FLOPs. The tokenizer's forward FLOPs per image are counted by torch's
  ``FlopCounterMode`` on the preset's modules built on the ``meta`` device (no weights, no download); the
  quantiser's nearest-code search is 2·N·K·D per depth; training is 3x the forward of the trained modules plus
  the frozen teacher's forward. The LLM is 6 x parameters per token (the public parameter counts of the
  Qwen2.5 models) plus the depth transformer (6 x its parameters per depth token). Hours = FLOPs / (the GPU's
  dense bf16 peak x an assumed MFU). Only the tiny and small presets have been measured on a GPU so far
  (docs/performance.md); their rates do not carry over to these sizes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}  # dense, vendor data sheets
LLM_PARAMS = {"qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.62e9}  # the Qwen2.5 model cards
TAR_BYTES = 3 * 512 + 1024  # tar headers of a sample's members + padding, on average
JSON_BYTES = 200  # a caption record


@dataclass
class PlanInput:
    images: int = 13_000_000
    resolution: int = 256
    shard_samples: int = 10_000
    image_kb: float = 30.0
    """Stored size of one image (a 256-px JPEG q95 photo is typically 20-40 kB): an assumption."""
    tokenizer: str = "base-256"
    stage1_steps: int = 500_000
    stage1_batch: int = 256
    llm: str = "qwen2.5-7b"
    text_tokens: int = 64
    """Text tokens per stage-2 sample (prompt or conversation), besides the image positions."""
    stage2_epochs: float = 1.0
    gpu: str = "h200"
    mfu_tokenizer: float = 0.35
    mfu_llm: float = 0.40
    build_results: str = "benchmarks/results/build_shards.json"


def tokenizer_flops(preset_name: str, resolution: int | None = None) -> dict[str, Any]:
    """Forward FLOPs per image of each part of the preset tokenizer, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tokenizer.config import preset
    from tokenizer.model import EvoTokenizer

    cfg = preset(preset_name)
    if resolution is not None and resolution != cfg.encoder.image_size:
        from unimllm.errors import ArtifactError

        raise ArtifactError(f"--resolution {resolution}: tokenizer preset {preset_name} reads "
                            f"{cfg.encoder.image_size}-px images")
    with torch.device("meta"):
        model = EvoTokenizer(cfg, with_teacher=True)
    q, res = cfg.quantizer, cfg.encoder.image_size
    g = model.encoder.grid_size
    x = torch.zeros(1, 3, res, res, device="meta")
    z = torch.zeros(1, g, g, q.dim, device="meta")

    def count(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())

    parts = {"encoder": count(lambda: model.encoder(x)), "pixel_decoder": count(lambda: model.pixel_decoder(z)),
             "semantic_decoder": count(lambda: model.semantic_decoder(z)),
             "teacher": count(lambda: model.teacher_features(x)),
             "quantizer_search": 2.0 * g * g * q.codebook_size * q.dim * q.depth_sem}
    trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("teacher."))
    return {"grid": g, "depth_sem": q.depth_sem, "codebook_size": q.codebook_size, "params": trainable,
            "forward_flops": parts}


def build_rates(path: str | Path) -> dict[str, Any] | None:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else None


def plan(inp: PlanInput) -> list[dict[str, Any]]:
    """The table's rows: {"item", "value", "source"}."""
    tok = tokenizer_flops(inp.tokenizer, inp.resolution)
    f = tok["forward_flops"]
    n, g, L = inp.images, tok["grid"], tok["depth_sem"]
    peak = PEAK_BF16_TFLOPS[inp.gpu] * 1e12
    rows = [{"item": "shards", "value": f"{math.ceil(n / inp.shard_samples):,} of {inp.shard_samples:,} samples",
             "source": "exact"}]
    image_bytes = n * (inp.image_kb * 1024 + JSON_BYTES + TAR_BYTES)
    codes_bytes = n * (g * g * L * 2 + 128 + 512)
    rows += [{"item": "disk: image shards", "value": f"{image_bytes / 1e12:.2f} TB",
              "source": f"assumed {inp.image_kb:g} kB an image"},
             {"item": "disk: + codes.npy", "value": f"{codes_bytes / 1e12:.2f} TB ({g}x{g}x{L} uint16 a sample)",
              "source": "exact"}]
    bench = build_rates(inp.build_results)
    if not bench:
        rows.append({"item": "CPU-hours: build shards", "value": "n/a",
                     "source": f"no measurement at {inp.build_results}: run benchmarks/build_shards.py"})
    else:
        for mode, label in (("keep", "as stored"), ("reencode", "resized + re-encoded")):
            r = bench["results"][mode]
            per_core = r["build_1w"]
            rows.append({"item": f"CPU-hours: build shards ({label})", "value": f"{n / per_core / 3600:,.1f}",
                         "source": f"measured: {per_core:,.0f} img/s on one core of {bench['machine']} "
                                   f"({bench['side']}-px JPEG)"})
    encode = f["encoder"] + f["quantizer_search"]
    hours = lambda flops, mfu: flops / (peak * mfu) / 3600  # noqa: E731
    rows.append({"item": "GPU-hours: encode codes (stage-2 input)", "value": f"{hours(n * encode, inp.mfu_tokenizer):,.1f}",
                 "source": f"estimate: {encode / 1e9:.0f} GFLOP an image, {inp.gpu} at MFU {inp.mfu_tokenizer:g}"})
    train = 3 * (f["encoder"] + f["pixel_decoder"] + f["semantic_decoder"]) + f["teacher"] + f["quantizer_search"]
    images1 = inp.stage1_steps * inp.stage1_batch
    rows.append({"item": f"GPU-hours: stage 1 ({inp.stage1_steps:,} steps x {inp.stage1_batch})",
                 "value": f"{hours(images1 * train, inp.mfu_tokenizer):,.1f}",
                 "source": f"estimate: {train / 1e9:.0f} GFLOP an image ({tok['params'] / 1e6:.0f}M trained parameters), "
                           f"MFU {inp.mfu_tokenizer:g}"})
    llm = LLM_PARAMS[inp.llm]
    depth = 12 * 6 * 2560**2  # the reference depth transformer: 6 layers, width 2560
    tokens = g * g + inp.text_tokens
    per_sample = 6 * llm * tokens + 6 * depth * g * g * 4  # 4 depth tokens (L_pix) per generated position
    samples2 = inp.stage2_epochs * n
    rows.append({"item": f"GPU-hours: stage 2 ({inp.llm}, {inp.stage2_epochs:g} epoch of the images)",
                 "value": f"{hours(samples2 * per_sample, inp.mfu_llm):,.1f}",
                 "source": f"estimate: {per_sample / 1e12:.1f} TFLOP a sample ({tokens} tokens), MFU {inp.mfu_llm:g}"})
    return rows


def format_plan(inp: PlanInput, rows: list[dict[str, Any]]) -> str:
    head = (f"Plan: {inp.images:,} images at {inp.resolution} px, tokenizer {inp.tokenizer}, LLM {inp.llm}, "
            f"GPU {inp.gpu} ({PEAK_BF16_TFLOPS[inp.gpu]:g} TFLOPS bf16 dense)\n\n| item | value | source |\n|---|---|---|\n")
    return head + "".join(f"| {r['item']} | {r['value']} | {r['source']} |\n" for r in rows)


def plan_json(inp: PlanInput, rows: list[dict[str, Any]]) -> str:
    return json.dumps({"input": asdict(inp), "rows": rows}, indent=2)
