"""Stage 1: train the EvoTok tokenizer.

    python launch/stage1.py --config launch/configs/stage1/tiny.yaml [--dotted.key VALUE ...]
    deepspeed --num_accelerators 2 launch/stage1.py --config launch/configs/stage1/tiny.yaml
    deepspeed --hostfile hosts launch/stage1.py --config launch/configs/stage1/base-256.yaml
    torchrun --nproc_per_node 8 launch/stage1.py --config ...

`model_preset` (tiny, base-256) fills the `model` section; YAML and CLI override its fields. Writes
<run.out_dir>/{config.yaml, metrics.jsonl, images/, checkpoints/, export/tokenizer/}; resumes from the
latest checkpoint of that directory automatically (train.resume).
"""

from __future__ import annotations

import sys

from unimllm.runtime import cpu_thread_defaults

cpu_thread_defaults()  # before torch loads: OpenMP reads its wait policy once (unimllm.runtime)

from unimllm.command_line import parse_cli
from unimllm.distributed import init_distributed
from unimllm.errors import user_errors
from unimllm.stages.tokenizer_stage import Stage1Config, Stage1Task, model_presets
from unimllm.trainer import Trainer


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_cli(Stage1Config, argv, preset_key="model_preset", presets=model_presets)
    dist = init_distributed(cfg.train.device)
    return Trainer(Stage1Task(cfg), run=cfg.run, train=cfg.train, dist=dist, config=cfg).fit()


if __name__ == "__main__":
    with user_errors():  # one line and exit status 2 (3: diverged), not a traceback
        main(sys.argv[1:])
