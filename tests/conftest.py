"""Shared test helpers: the deepspeed launcher, tiny exports built without training, and shapes-world shards
with codes precomputed by a tiny tokenizer (shared by the stage-2 and CLI tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Text the tiny BPE text tokenizer of the unified exports is trained on.
TEXTS = ["a photo of a red circle", "Is there a blue square in the image? Please answer yes or no.", "Yes", "No",
         "a photo of two green triangles", "a photo of a circle left of a square"] * 20


def deepspeed_launch(script: Path, argv: list[str], port: int, timeout: int = 600) -> None:
    """Run ``deepspeed --num_accelerators 2 script argv`` on the CPU (gloo) and assert it succeeded."""
    ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert ds, "the deepspeed launcher is not installed next to this python"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    cmd = [ds, "--num_accelerators", "2", "--master_port", str(port), str(script), *argv]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def tiny_tokenizer_config():
    """The tokenizer's tiny preset shrunk for tests (64 px, 8x8 grid, L_sem 8, L_pix 4, 64 codes)."""
    from tokenizer.config import preset

    cfg = preset("tiny")
    cfg.pixel_decoder.channels, cfg.pixel_decoder.z_channels = 16, 16
    cfg.quantizer.codebook_size = 64
    return cfg


def save_tiny_tokenizer(out: Path, seed: int = 0):
    """A random tiny EvoTokenizer (no teacher) saved to ``out``; returned in eval mode."""
    import torch

    from tokenizer.model import EvoTokenizer

    torch.manual_seed(seed)
    tok = EvoTokenizer(tiny_tokenizer_config(), with_teacher=False).eval()
    tok.save_pretrained(out)
    return tok


def save_tiny_unified(out: Path, tokenizer, tokenizer_dir: Path):
    """A random tiny unified model (Qwen2-style LLM, its own BPE text tokenizer) over ``tokenizer`` (saved at
    ``tokenizer_dir``), exported to ``out``; returns the model."""
    from llm.config import DepthConfig, LLMConfig, SamplerConfig, UnifiedConfig
    from llm.model import build_unified
    from llm.text_tokenizer import train_text_tokenizer
    from unimllm.stages.artifacts import tokenizer_reference

    text_tok = train_text_tokenizer(TEXTS, 300)
    ucfg = UnifiedConfig(llm=LLMConfig(arch="qwen2", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                       intermediate_size=64), depth=DepthConfig(layers=1, width=32, heads=4),
                         freeze_llm=False, sampler=SamplerConfig(cfg_scale=3.0, top_k=0, top_p=1.0))
    model = build_unified(ucfg, text_tok, [], tokenizer)
    model.save_pretrained(out, text_tokenizer=text_tok, tokenizer_ref=tokenizer_reference(tokenizer_dir))
    return model


@pytest.fixture(scope="session")
def stage2_world(tmp_path_factory) -> Path:
    """Shapes shards (train + val + GenEval prompts), a small random tokenizer (``tok``), and codes precomputed
    with it (``codes``)."""
    from data.shapes_cli import DatasetConfig, write_dataset
    from unimllm.stages.precompute_codes import precompute

    out = tmp_path_factory.mktemp("world")
    write_dataset(DatasetConfig(out=str(out / "shapes"), n=48, n_val=16, shard_size=16, workers=0, geneval_per_tag=2),
                  log=lambda *_: None)
    save_tiny_tokenizer(out / "tok")
    summary = precompute(out / "tok", str(out / "shapes/train/shapes-train-{000000..000002}.tar"), out / "codes")
    assert summary["samples"] == 48
    return out
