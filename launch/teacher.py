"""Stage 0 (shapes world only): train the semantic teacher that stage 1's semantic decoder regresses.

    python launch/teacher.py --config launch/configs/teacher/shapes.yaml [--dotted.key VALUE ...]

The shapes world has no pretrained SigLIP2, so `make demo` trains a small SigLIP-architecture tower on the
per-cell object labels the world knows at render time (unimllm/stages/teacher_stage.py). Writes
<run.out_dir>/{config.yaml, metrics.jsonl, checkpoints/, export/teacher/}; export/teacher is a Hugging Face
model directory for stage 1's `model.teacher.pretrained` (with `model.teacher.feature_layer: -1`).
"""

from __future__ import annotations

import sys

from unimllm.runtime import cpu_thread_defaults

cpu_thread_defaults()  # before torch loads: OpenMP reads its wait policy once (unimllm.runtime)

from unimllm.command_line import parse_cli
from unimllm.distributed import init_distributed
from unimllm.errors import user_errors
from unimllm.stages.teacher_stage import TeacherStageConfig, TeacherTask
from unimllm.trainer import Trainer


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_cli(TeacherStageConfig, argv)
    dist = init_distributed(cfg.train.device)
    return Trainer(TeacherTask(cfg), run=cfg.run, train=cfg.train, dist=dist, config=cfg).fit()


if __name__ == "__main__":
    with user_errors():  # one line and exit status 2 (3: diverged), not a traceback
        main(sys.argv[1:])
