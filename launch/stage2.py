"""Stage 2: one unified model - align a causal LM to the frozen EvoTok tokenizer for understanding and generation.

    python launch/stage2.py --config launch/configs/stage2/tiny.yaml [--dotted.key VALUE ...]
    deepspeed --num_accelerators 2 launch/stage2.py --config launch/configs/stage2/tiny.yaml
    deepspeed --hostfile hosts launch/stage2.py --config launch/configs/stage2/qwen2.5-7b.yaml

`model_preset` (tiny, qwen2.5-1.5b, qwen2.5-7b) fills the `model` section; YAML and CLI override its fields.
Writes <run.out_dir>/{config.yaml, metrics.jsonl, images/, checkpoints/, text_tokenizer/ (tiny),
export/unified/} and resumes from the run's latest checkpoint (train.resume). The export loads without
DeepSpeed: unimllm.stages.pipeline.UnifiedPipeline.from_pretrained(<run.out_dir>/export/unified).
"""

from __future__ import annotations

import os
import sys

from unimllm.runtime import cpu_thread_defaults

cpu_thread_defaults()  # before torch loads: OpenMP reads its wait policy once (unimllm.runtime)

from unimllm.command_line import parse_cli
from unimllm.distributed import init_distributed
from unimllm.errors import user_errors
from unimllm.stages.alignment_config import Stage2Config, model_presets
from unimllm.stages.alignment_stage import Stage2Task
from unimllm.trainer import Trainer


def main(argv: list[str] | None = None) -> dict[str, float]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers fork after the tokenizer is built
    cfg = parse_cli(Stage2Config, argv, preset_key="model_preset", presets=model_presets)
    dist = init_distributed(cfg.train.device)
    return Trainer(Stage2Task(cfg), run=cfg.run, train=cfg.train, dist=dist, config=cfg).fit()


if __name__ == "__main__":
    with user_errors():  # one line and exit status 2 (3: diverged), not a traceback
        main(sys.argv[1:])
