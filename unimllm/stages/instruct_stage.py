"""Stage 3 as a trainer Task: instruction tuning of a stage-2 unified model in both directions, full or LoRA.

Starts from a stage-2 export named by ``init_from`` (its LLM, heads and text tokenizer, and the frozen EvoTok
tokenizer it references by path + sha256). Each record becomes one of three conversations, drawn with the
weights ``mix.understanding / generation / mixed`` among those the record supports:

  * understanding: its own LLaVA conversation (multi-turn, ``<image>`` in a human turn);
  * generation: an instruction built from its prompt or caption with a varied template ("Draw a red circle.",
    "Can you make a picture of ...?"), answered by the image; or its own conversation when the image is in a
    gpt turn;
  * mixed: the instruction, the image, then yes/no questions about the drawn image (the record's ``mme``
    pairs) answered in text with the generated image in context.

The loss covers assistant turns only (``llm.conversation``). Batching, the step, validation and export are
stage 2's (:class:`unimllm.stages.alignment_stage.Stage2Task`); stage 3 changes where the model comes from, which parameters train
(full, or LoRA adapters through peft + projectors + depth transformer, merged into the LLM on export) and how
records become conversations. Validation adds the mixed-turn skill: yes/no accuracy on questions asked after
the held-out image sits, teacher-forced, in an assistant generation turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from data.config import DataConfig
from data.schema import SampleError
from llm.config import UnifiedConfig
from llm.conversation import ConversationEncoder
from llm.lora import LoraConfig, add_lora
from llm.model import CONFIG_NAME, TEXT_TOKENIZER_DIR, UnifiedModel, read_meta
from llm.text_tokenizer import IMAGE_TOKEN, load_text_tokenizer
from unimllm.config import ConfigError, from_dict, to_dict
from unimllm.distributed import all_reduce_sums
from unimllm.stages.alignment_config import Stage2ValConfig
from unimllm.stages.alignment_stage import Stage2Task
from unimllm.stages.artifacts import resolve_tokenizer, unified_export
from unimllm.stages.pipeline import generate_replies
from unimllm.stages.samples import BAD_RECORD, SequenceSample
from unimllm.trainer import OptimConfig, RunConfig, TrainConfig

MODES = ("understanding", "generation", "mixed")
# Generation instructions: a noun phrase ("a red circle left of a blue square") or a description (a caption).
PHRASE_TEMPLATES = ("{}", "Draw {}.", "Please draw {}.", "Generate an image of {}.", "Can you make a picture of {}?",
                    "Create an image of {}.", "Show me {}.")
CAPTION_TEMPLATES = ("{}", "Draw this: {}", "Generate an image that matches this description. {}",
                     "Can you make a picture of this? {}")
_PHOTO_OF = re.compile(r"^(a photo of|a picture of|an image of)\s+", re.IGNORECASE)


@dataclass
class TuneConfig:
    """What trains. The depth transformer and both projectors always train."""

    method: Literal["full", "lora"] = "lora"
    """full: every LLM weight trains; lora: the LLM stays frozen and low-rank adapters train."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters (method: lora)."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in backward (saves memory)."""
    text_weight: float = 1.0
    """Weight of the text cross-entropy (assistant tokens)."""
    image_weight: float = 1.0
    """Weight of the image-code cross-entropy."""

    def validate(self) -> None:
        if self.text_weight < 0 or self.image_weight < 0 or self.text_weight + self.image_weight == 0:
            raise ConfigError("text_weight", "loss weights must be >= 0 and not both 0")


@dataclass
class InstructMixConfig:
    """How records become instruction conversations (weights are renormalised over what a record supports)."""

    understanding: float = 1.0
    """Weight of the record's own multi-turn conversation about its image."""
    generation: float = 1.0
    """Weight of a templated drawing instruction answered by the image."""
    mixed: float = 1.0
    """Weight of: instruction, the image, then yes/no questions (``mme`` pairs) about the drawn image."""
    shuffle_turns: bool = False
    """Understanding: the conversation's (question, answer) pairs in a random order, the image in front of the
    first question (see stage 2's ``mix.shuffle_turns``: no answer copied from an earlier description)."""
    independent_turns: bool = False
    """Understanding: every (question, answer) pair as its own attention block after the shared image (stage
    2's ``mix.independent_turns``: each answered as if asked alone); the conversation itself is not trained.
    Takes precedence over ``shuffle_turns``."""
    followups: int = 2
    """Mixed: the most questions after the image (1..followups, uniformly)."""
    prompt_key: str = "prompt"
    """JSON field with a noun-phrase prompt ("a photo of a red circle"), templated as "Draw a red circle."."""
    caption_key: str = "caption"
    """JSON field with a description, templated as "Draw this: <caption>"."""
    caption_prob: float = 0.3
    """Instructions built from the caption rather than the prompt when a record has both."""
    uncond_prob: float = 0.1
    """Generation instructions replaced by "" (keeps the unconditional branch of CFG trained)."""
    max_length: int = 2048
    """Longest sequence; longer ones are cut after their image, or dropped (counted) if the cut hits it."""
    group_batches: int = 8
    """Length grouping: sort this many micro-batches' samples by length and re-batch them (1 = off)."""
    split_tasks: bool = False
    """Micro-batches keep the understanding/generation mix, one forward per task (stage 2's ``mix.split_tasks``)."""
    pack: bool = False
    """Pack several samples into each row (stage 2's ``mix.pack``)."""
    pack_tokens: int = 0
    """Row length when packing (0: the micro-batch's longest sample)."""
    image_source: Literal["auto", "codes", "images"] = "auto"
    """auto: precomputed codes.npy when the shards have a codes_manifest.json, else encode images on the fly."""

    def validate(self) -> None:
        w = (self.understanding, self.generation, self.mixed)
        if min(w) < 0 or sum(w) == 0:
            raise ConfigError("understanding", "mode weights must be >= 0 and not all 0")
        if not 0 <= self.caption_prob <= 1 or not 0 <= self.uncond_prob < 1:
            raise ConfigError("caption_prob", "caption_prob in [0, 1], uncond_prob in [0, 1)")
        if self.followups < 1 or self.group_batches < 1 or self.max_length < 8:
            raise ConfigError("followups", "followups >= 1, group_batches >= 1 and max_length >= 8")


@dataclass
class Stage3Config:
    """Stage 3: instruction tuning of a stage-2 unified model (``launch/stage3.py``)."""

    init_from: str = ""
    """Stage-2 export directory to start from (``runs/stage2/tiny/export/unified``); its text tokenizer is used."""
    tokenizer: str = ""
    """Stage-1 tokenizer export; empty = the one the stage-2 export references (sha256-checked either way)."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Full fine-tuning or LoRA, and the loss weights."""
    mix: InstructMixConfig = field(default_factory=InstructMixConfig)
    """Conversation building and sequence handling."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training shards, mixed by source weight; batch_size is the micro-batch."""
    val: Stage2ValConfig = field(default_factory=Stage2ValConfig)
    """Held-out evaluation (stage 2's, plus questions asked after a drawn image)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output directory and logging."""

    def validate(self) -> None:
        if not self.init_from:
            raise ConfigError("init_from", "set the stage-2 export directory to start from "
                                           "(e.g. runs/stage2/tiny/export/unified)")
        if not self.data.sources:
            raise ConfigError("data.sources", "no training shards configured")
        if not self.data.read_json:
            raise ConfigError("data.read_json", "stage 3 reads each record's json (conversations, prompts)")


# ----------------------------------------------------------------------------- conversations


class InstructionSample(SequenceSample):
    """Map function: record -> an understanding, generation or mixed conversation, encoded (+ codes or image)."""

    def instruction(self, meta: dict, rng: np.random.Generator) -> str:
        """A drawing instruction from the record's prompt (noun phrase) or caption, with a random template."""
        phrase, caption = (meta.get(k) if isinstance(meta.get(k), str) and meta[k].strip() else None
                           for k in (self.mix.prompt_key, self.mix.caption_key))
        if caption and (phrase is None or rng.random() < self.mix.caption_prob):
            return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(caption)
        template = PHRASE_TEMPLATES[int(rng.integers(len(PHRASE_TEMPLATES)))]
        return template.format(phrase if template == "{}" else _PHOTO_OF.sub("", phrase))

    def conversation(self, meta: dict, rng: np.random.Generator) -> list[dict] | list[list[dict]]:
        conv = meta.get("conversations") or []
        image_roles = {t.get("from") for t in conv if isinstance(t, dict) and IMAGE_TOKEN in str(t.get("value"))}
        has_text = any(isinstance(meta.get(k), str) and meta[k].strip() for k in (self.mix.prompt_key, self.mix.caption_key))
        qa = [(q["question"], q["answer"]) for pairs in (meta.get("mme") or {}).values() for q in pairs
              if isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("answer"), str)]
        own_gen = bool(image_roles & {"gpt", "assistant"})
        ok = (bool(image_roles & {"human", "user"}), own_gen or has_text, has_text and bool(qa))
        w = np.array([wt * o for wt, o in zip((self.mix.understanding, self.mix.generation, self.mix.mixed), ok)], float)
        if w.sum() == 0:
            raise SampleError(BAD_RECORD, f"no {IMAGE_TOKEN} conversation and no {self.mix.prompt_key}/"
                                          f"{self.mix.caption_key} usable with the mode weights")
        mode = MODES[int(rng.choice(3, p=w / w.sum()))]
        if mode == "understanding" and self.mix.independent_turns:
            return self.turn_blocks(conv)
        if mode == "understanding" and self.mix.shuffle_turns:
            return self.shuffled_turns(conv, rng)
        if mode == "understanding" or (mode == "generation" and own_gen):
            return conv
        ask = "" if mode == "generation" and rng.random() < self.mix.uncond_prob else self.instruction(meta, rng)
        turns = [{"from": "human", "value": ask}, {"from": "gpt", "value": IMAGE_TOKEN}]
        if mode == "mixed":
            k = min(len(qa), int(rng.integers(1, self.mix.followups + 1)))
            for j in rng.permutation(len(qa))[:k]:
                turns += [{"from": "human", "value": qa[j][0]}, {"from": "gpt", "value": qa[j][1]}]
        return turns


# ----------------------------------------------------------------------------- follow-up questions


@torch.no_grad()
def answer_after_drawing(model: UnifiedModel, text_tokenizer, codes: torch.Tensor, prompts: list[str],
                         questions: list[str], *, max_new_tokens: int = 4, batch: int = 16) -> list[str]:
    """Greedy replies to ``questions`` asked after an assistant turn that drew ``codes`` (n, N, L_pix) for
    ``prompts``: the codes sit teacher-forced in the generation slots, as in a mixed training conversation."""
    enc = ConversationEncoder(text_tokenizer, model.image_positions)
    replies: list[str] = []
    for i in range(0, len(questions), batch):
        convs = [[{"from": "human", "value": p}, {"from": "gpt", "value": IMAGE_TOKEN}, {"from": "human", "value": q}]
                 for p, q in zip(prompts[i: i + batch], questions[i: i + batch])]
        replies += generate_replies(model, text_tokenizer, [enc.reply_prompt(c) for c in convs],
                                    gen_codes=codes[i: i + batch].to(model.codebooks.device),
                                    max_new_tokens=max_new_tokens)
    return replies


# ----------------------------------------------------------------------------- the task


class Stage3Task(Stage2Task):
    """Stage 2's data path, step, validation and export on a model loaded from ``init_from``."""

    cfg: Stage3Config

    def build_model(self) -> None:
        cfg, t = self.cfg, self.cfg.tune
        src = unified_export(cfg.init_from, "init_from")
        try:
            meta = read_meta(src)
        except (OSError, ValueError) as e:
            raise ValueError(f"init_from: {e}") from None
        tok = resolve_tokenizer(src, cfg.tokenizer or None, field="tokenizer")  # path + sha256 check
        self.load_tokenizer(tok.path, "tokenizer" if cfg.tokenizer else
                            f"init_from ({src} references its tokenizer by path; set tokenizer if it moved)")
        self.text_tokenizer, added = load_text_tokenizer(src / TEXT_TOKENIZER_DIR, "init_from")
        if added:
            raise ValueError(f"init_from: {src / TEXT_TOKENIZER_DIR} lacks the image tokens {added}")
        saved = from_dict(UnifiedConfig, meta["model"], source=str(src / CONFIG_NAME))
        mcfg = replace(saved, freeze_llm=t.method != "full", gradient_checkpointing=t.gradient_checkpointing,
                       text_weight=t.text_weight, image_weight=t.image_weight)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.model = UnifiedModel.from_pretrained(src, device=self.device, dtype=dtype, cfg=mcfg)
        if t.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.param_groups = self.model.configure_trainable() if t.method == "full" else self._add_lora()

    def _add_lora(self) -> list[dict]:
        """Wrap the LLM with peft LoRA adapters; param groups: heads (projectors, depth) + adapters."""
        self.model.llm = add_lora(self.model.llm, self.cfg.tune.lora, field="tune.lora")
        heads = [p for n, p in self.model.named_parameters() if not n.startswith("llm.")]
        for p in heads:
            p.requires_grad_(True)
        adapters = [p for n, p in self.model.llm.named_parameters() if "lora_" in n]
        return [{"params": heads}, {"params": adapters}]

    def sequence_sample(self) -> InstructionSample:
        return InstructionSample(self.encoder, self.cfg.mix, self.cfg.data.image, self.use_codes)

    def export_model(self) -> UnifiedModel:
        """LoRA merged into the LLM (every rank, so ZeRO-3's module lists stay alike): a plain unified model."""
        from peft import PeftModel

        if isinstance(self.model.llm, PeftModel):
            self.model.llm = self.model.llm.merge_and_unload()
        return self.model

    def meta(self) -> dict:
        return {"model_config": to_dict(self.model.cfg), "dims": self.model.dims.__dict__,
                "init_from": str(Path(self.cfg.init_from).resolve())}

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self) -> dict[str, float]:
        out = super()._evaluate()
        v, key = self.cfg.val, self.cfg.mix.prompt_key
        if not v.shards:
            return out
        per_rank = max(1, v.max_questions // self.dist.world_size)
        items = []  # (codes (h, w, L_sem), prompt, question, answer)
        for codes, recs in self._val_records(per_rank):
            items += [(c, rec[key], qa["question"], qa["answer"].strip().lower()) for c, rec in zip(codes, recs)
                      if isinstance(rec.get(key), str) for pairs in (rec.get("mme") or {}).values() for qa in pairs]
            if len(items) >= per_rank:
                break
        sums = {"n": 0.0, "ok": 0.0}
        if items:
            from eval.mme import parse_yes_no

            items = items[:per_rank]
            L = self.model.dims.depth_pix
            codes = torch.stack([c for c, *_ in items])[..., :L].flatten(1, 2)  # (n, N, L_pix)
            self.model.eval()
            replies = answer_after_drawing(self.model, self.text_tokenizer, codes, [p for _, p, _, _ in items],
                                           [q for _, _, q, _ in items], batch=v.batch_size)
            self.model.train()
            sums = {"n": float(len(items)), "ok": float(sum(parse_yes_no(r) == a for r, (*_, a) in zip(replies, items)))}
        tot = all_reduce_sums(sums)  # collective: every rank calls it
        if tot["n"]:
            out["val/followup_yes_no_acc"] = tot["ok"] / tot["n"]
        return out
