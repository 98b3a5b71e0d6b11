"""Stage 3: instruction tuning of a stage-2 unified model - both directions, full fine-tuning or LoRA.

    python launch/stage3.py --config launch/configs/stage3/tiny.yaml [--dotted.key VALUE ...]
    deepspeed --num_accelerators 2 launch/stage3.py --config launch/configs/stage3/tiny.yaml --train.zero_stage 2
    deepspeed --hostfile hosts launch/stage3.py --config launch/configs/stage3/qwen2.5-7b.yaml

`init_from` names the stage-2 export to start from (its LLM, heads, text tokenizer and referenced tokenizer).
Writes <run.out_dir>/{config.yaml, metrics.jsonl, images/, checkpoints/, export/unified/} and resumes from the
run's latest checkpoint (train.resume). LoRA is merged on export, so the export is a plain unified checkpoint:
unimllm.stages.pipeline.UnifiedPipeline.from_pretrained(<run.out_dir>/export/unified).
"""

from __future__ import annotations

import os
import sys

from unimllm.runtime import cpu_thread_defaults

cpu_thread_defaults()  # before torch loads: OpenMP reads its wait policy once (unimllm.runtime)

from unimllm.command_line import parse_cli
from unimllm.distributed import init_distributed
from unimllm.errors import user_errors
from unimllm.stages.instruct_stage import Stage3Config, Stage3Task
from unimllm.trainer import Trainer


def main(argv: list[str] | None = None) -> dict[str, float]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers fork after the tokenizer is built
    cfg = parse_cli(Stage3Config, argv)
    dist = init_distributed(cfg.train.device)
    return Trainer(Stage3Task(cfg), run=cfg.run, train=cfg.train, dist=dist, config=cfg).fit()


if __name__ == "__main__":
    with user_errors():  # one line and exit status 2 (3: diverged), not a traceback
        main(sys.argv[1:])
