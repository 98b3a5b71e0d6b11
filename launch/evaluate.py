"""Evaluate a checkpoint on one suite: tokenizer reconstruction, MME, POPE, GenEval, or the shapes world.

    python launch/evaluate.py --config launch/configs/eval/shapes.yaml [--ckpt DIR] [--out DIR] [--dotted.key VALUE]
    python launch/evaluate.py --suite recon --ckpt runs/stage1/tiny/export/tokenizer --recon.source 'val-{000..049}.tar'
    python launch/evaluate.py --suite mme --ckpt runs/stage2/qwen2.5-7b/export/unified --mme.path data/MME
    python launch/evaluate.py --suite pope --ckpt ... --pope.path data/POPE --pope.image_root data/coco/val2014
    python launch/evaluate.py --suite geneval --ckpt ... [--geneval.scorer_python ENV/bin/python
        --geneval.geneval_dir geneval --geneval.detector_path DET]   # without them: generate, print how to score
    torchrun --nproc_per_node 8 launch/evaluate.py ...   # ranks split questions, prompts and recon images

``--ckpt``: a stage-2 unified export (or its run folder); ``--suite recon`` also takes a stage-1 tokenizer
export. Output: ``--out``, default ``<run>/eval/<suite>`` for ``<run>/export/<name>``: settings.json (config,
sampler, seeds, sha256 of the checkpoint and every data file, evaluator versions), scores.json, report.md,
metrics.jsonl, predictions / the GenEval layout (unimllm.stages.evaluation lists them). A rerun resumes GenEval generation.
``--help`` lists every option (eval.config.EvalConfig).
"""

from __future__ import annotations

import os
import sys

from unimllm.runtime import cpu_thread_defaults

cpu_thread_defaults()  # before torch loads: OpenMP reads its wait policy once (unimllm.runtime)

from eval.config import EvalConfig
from unimllm.command_line import parse_cli
from unimllm.distributed import init_distributed
from unimllm.errors import user_errors
from unimllm.stages.evaluation import run


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_cli(EvalConfig, argv)
    dist = init_distributed(cfg.device)
    return run(cfg, dist, argv)


if __name__ == "__main__":
    with user_errors():  # one line and exit status 2 (3: diverged), not a traceback
        main(sys.argv[1:])
