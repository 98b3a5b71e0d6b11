"""Stage 2's config tree: how records become sequences (:class:`MixConfig`), the text tokenizer, validation,
and the root :class:`Stage2Config` (``launch/stage2.py``; presets in ``launch/configs/stage2/``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data.config import DataConfig
from llm.config import UnifiedConfig, preset
from unimllm.config import ConfigError, to_dict
from unimllm.trainer import OptimConfig, RunConfig, TrainConfig


@dataclass
class MixConfig:
    """How records become training sequences."""

    generation_ratio: float = 0.5
    """Fraction of records usable both ways (a conversation and a prompt) that become generation samples."""
    prompt_keys: list[str] = field(default_factory=lambda: ["prompt", "caption"])
    """JSON fields a generation prompt is read from (the first present)."""
    caption_prob: float = 0.0
    """Generation samples conditioned on the record's ``caption`` (a full description: every object's colour,
    counts, coarse positions) instead of its first ``prompt_keys`` field. A short prompt says little about
    the codes, so the image loss barely rewards reading it; captions make text-following pay."""
    uncond_prob: float = 0.1
    """Generation samples whose prompt is replaced by "" (trains the unconditional branch of CFG)."""
    single_turn_prob: float = 0.0
    """Understanding samples cut to one random question/answer turn asked right after the image (so a
    question is also seen as the first turn, as benchmarks ask it)."""
    shuffle_turns: bool = False
    """Understanding samples get their (question, answer) pairs in a random order, the image moved to the
    first question. With a fixed order ("Describe the image." first), every later question can be answered
    by copying from the description, and the model never learns to answer one from the image itself."""
    independent_turns: bool = False
    """Understanding samples pack every (question, answer) pair as its own attention block after the shared
    image (``ConversationEncoder.encode_blocks``): each answer is trained exactly as if its question were
    asked alone right after the image, as benchmarks ask it, and none can be copied from another turn
    (a description, an open question, the other question of a yes/no pair). Needs sdpa or eager attention.
    Takes precedence over ``shuffle_turns`` and ``single_turn_prob`` (both unused when it is on)."""
    max_length: int = 2048
    """Longest sequence; longer ones are cut after their image, or dropped (counted) if the cut hits it."""
    group_batches: int = 8
    """Length grouping: sort this many micro-batches' samples by length and re-batch them (1 = off)."""
    split_tasks: bool = False
    """Every micro-batch keeps the understanding/generation mix (length-grouped within each task) and runs as
    one forward per task, each padded to its own longest sample, and one backward. Plain length grouping
    makes micro-batches of one task each; alternating them, the tiny model learned generation 3-4x slower
    per step (docs/results.md), and mixing them without grouping pads every generation row to an
    understanding row's length (1.6x slower steps)."""
    pack: bool = False
    """Pack several samples into each row of a micro-batch (first fit, in order), each attending only to itself
    with positions restarting at 0 (llm.batch.pack_sequences): less padding, the same losses as unpacked rows.
    Needs sdpa or eager attention."""
    pack_tokens: int = 0
    """Row length when packing (0: the micro-batch's longest sample)."""
    image_source: Literal["auto", "codes", "images"] = "auto"
    """auto: precomputed codes.npy when the shards have a codes_manifest.json, else encode images on the fly."""

    def validate(self) -> None:
        if not all(0 <= p <= 1 for p in (self.generation_ratio, self.single_turn_prob, self.caption_prob)) \
                or not 0 <= self.uncond_prob < 1:
            raise ConfigError("generation_ratio", "generation_ratio, single_turn_prob and caption_prob in [0, 1], "
                                                  "uncond_prob in [0, 1)")
        if self.group_batches < 1 or self.max_length < 8:
            raise ConfigError("group_batches", "group_batches >= 1 and max_length >= 8")


@dataclass
class TextTokenizerConfig:
    """Training of the text tokenizer (only when the LLM is random-init and no text_tokenizer is given)."""

    vocab_size: int = 512
    """BPE vocabulary size (special tokens included)."""
    max_records: int = 20000
    """Training-shard records read for the corpus."""


@dataclass
class Stage2ValConfig:
    """In-loop evaluation on held-out shapes-world data."""

    shards: str = ""
    """Held-out shards whose records carry ``mme`` questions (yes/no accuracy); empty = none."""
    max_questions: int = 400
    """Yes/no questions answered (over all ranks)."""
    geneval_prompts: str = ""
    """JSONL of GenEval-format prompts generated and scored by the shapes scorer; empty = none."""
    max_prompts: int = 300
    """Prompts generated (over all ranks), one image each."""
    batch_size: int = 32
    """Generation / answering batch per rank."""
    grid_images: int = 16
    """Generated samples in the logged grid."""
    seed: int = 0
    """Sampling seed (and the shuffled-prompt control's)."""


@dataclass
class Stage2Config:
    """Stage 2: one unified model for understanding and generation (``launch/stage2.py``)."""

    model_preset: str = "tiny"
    """Unified-model preset the `model` section starts from (tiny, qwen2.5-1.5b, qwen2.5-7b)."""
    model: UnifiedConfig = field(default_factory=UnifiedConfig)
    """The unified model."""
    text_tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    """Tiny text tokenizer training."""
    mix: MixConfig = field(default_factory=MixConfig)
    """Understanding/generation mixing and sequence handling."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training shards (records with conversations and/or prompts); batch_size is the micro-batch."""
    val: Stage2ValConfig = field(default_factory=Stage2ValConfig)
    """Held-out evaluation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output directory and logging."""

    def validate(self) -> None:
        if not self.model.tokenizer:
            raise ConfigError("model.tokenizer", "set the stage-1 tokenizer export directory")
        if not self.data.sources:
            raise ConfigError("data.sources", "no training shards configured")
        if not self.data.read_json:
            raise ConfigError("data.read_json", "stage 2 reads each record's json (conversations, prompts)")
        if self.mix.pack and self.model.llm.attn_implementation == "flash_attention_2":
            raise ConfigError("mix.pack", "packed samples need a 4D attention mask: sdpa or eager "
                                          "model.llm.attn_implementation, not flash_attention_2")
        if self.mix.independent_turns and self.model.llm.attn_implementation == "flash_attention_2":
            raise ConfigError("mix.independent_turns", "turn blocks need a 4D attention mask: sdpa or eager "
                                                       "model.llm.attn_implementation, not flash_attention_2")


def model_presets(name: str) -> dict:
    return {"model": to_dict(preset(name))}
