"""LoRA adapters on the causal LM (peft): the one place they are configured and attached.

Stage 3 trains them (``tune.method: lora``) and merges them into the LLM on export; ``unimllm export`` rebuilds
the same wrapper from a checkpoint's saved ``tune.lora`` to load its adapter weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from unimllm.config import ConfigError


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM (peft); merged into its weights on export."""

    rank: int = 64
    """Adapter rank r."""
    alpha: float = 128.0
    """Scaling numerator: the update is (alpha / rank) * B @ A."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    """LLM Linear layers (module-name suffixes) that get adapters."""

    def validate(self) -> None:
        if self.rank <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError("rank", "need rank > 0, alpha > 0 and dropout in [0, 1)")
        if not self.target_modules:
            raise ConfigError("target_modules", "name at least one LLM module")


def add_lora(llm: nn.Module, cfg: LoraConfig, *, field: str = "lora") -> nn.Module:
    """``llm`` wrapped in peft LoRA adapters per ``cfg`` (base weights frozen, adapters trainable); a target that
    matches no module is a ValueError naming ``<field>.target_modules``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                              target_modules=list(cfg.target_modules))
    try:
        return get_peft_model(llm, peft_cfg)
    except ValueError as e:
        raise ValueError(f"{field}.target_modules: {e}") from None
