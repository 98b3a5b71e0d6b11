"""Stage 2 as a trainer Task: align a causal LM to the frozen EvoTok tokenizer for understanding AND generation.

One engine ("unified": LLM + projectors + depth transformer; the tokenizer stays outside, frozen). Each
record becomes an understanding sample (its conversation, ``<image>`` in a user turn) or a generation
sample (user: its prompt, assistant: ``<image>``), mixed by ``mix.generation_ratio``; generation prompts
are dropped to "" with ``mix.uncond_prob`` so classifier-free guidance has an unconditional model.
Image codes come from the shards' ``codes.npy`` (``python -m data.precompute_codes``) or the tokenizer on
the fly. Validation on shapes-world held-out data: yes/no accuracy on MME-style questions, and GenEval
prompts generated and scored against their own and against shuffled prompts (the chance control).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from data.config import DataConfig, ImageConfig
from data.grouping import LengthGroupedBatches
from data.loader import StreamingLoader, eval_loader, existing_shards
from data.precompute_codes import codes_mismatch, read_codes_manifest, tokenizer_fingerprint
from data.schema import SampleError, sample_codes, sample_meta, sample_pixels
from data.transforms import ImageTransform, normalize
from llm.config import UnifiedConfig, preset
from llm.conversation import GEN, IGNORE, UND, ConversationEncoder
from llm.model import build_unified
from llm.pipeline import UnifiedPipeline, tokenizer_reference
from llm.text_tokenizer import IMAGE_TOKEN, corpus, load_text_tokenizer, train_text_tokenizer
from unimllm.config import ConfigError, to_dict
from unimllm.distributed import DistInfo, all_reduce_sums, barrier, gathered_parameters
from unimllm.trainer import OptimConfig, RunConfig, Task, TrainConfig

MISSING_CODES, BAD_RECORD = "missing_codes", "bad_record"


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
        if self.mix.independent_turns and self.model.llm.attn_implementation == "flash_attention_2":
            raise ConfigError("mix.independent_turns", "turn blocks need a 4D attention mask: sdpa or eager "
                                                       "model.llm.attn_implementation, not flash_attention_2")


def model_presets(name: str) -> dict:
    return {"model": to_dict(preset(name))}


class SequenceSample:
    """Map function: raw record -> encoded sequence + codes (or the image to encode)."""

    def __init__(self, encoder: ConversationEncoder, mix: MixConfig, image: ImageConfig, use_codes: bool):
        self.encoder, self.mix, self.use_codes = encoder, mix, use_codes
        self.transform = ImageTransform(image)

    def conversation(self, meta: dict, rng: np.random.Generator) -> list[dict] | list[list[dict]]:
        conv = meta.get("conversations") or []
        prompt = next((meta[k] for k in self.mix.prompt_keys if isinstance(meta.get(k), str)), None)
        turns_with_image = [t.get("from") for t in conv if isinstance(t, dict) and IMAGE_TOKEN in str(t.get("value"))]
        can_und = any(r in ("human", "user") for r in turns_with_image)
        gen_conv = any(r in ("gpt", "assistant") for r in turns_with_image)
        can_gen = gen_conv or prompt is not None
        if not (can_und or can_gen):
            raise SampleError(BAD_RECORD, f"no conversation with {IMAGE_TOKEN} and no prompt ({self.mix.prompt_keys})")
        generate = can_gen and (not can_und or rng.random() < self.mix.generation_ratio)
        if not generate:
            if self.mix.independent_turns:
                return self.turn_blocks(conv)
            if rng.random() < self.mix.single_turn_prob:
                return self.single_turn(conv, rng)
            return self.shuffled_turns(conv, rng) if self.mix.shuffle_turns else conv
        if not gen_conv:
            if self.mix.caption_prob and isinstance(meta.get("caption"), str) and rng.random() < self.mix.caption_prob:
                prompt = meta["caption"]
            conv = [{"from": "human", "value": prompt}, {"from": "gpt", "value": IMAGE_TOKEN}]
        if rng.random() < self.mix.uncond_prob:
            conv = [{"from": "human", "value": ""}, *conv[-1:]]
        return conv

    @staticmethod
    def _pairs(conv: list[dict]) -> list[int]:
        """Indices i of the (human, gpt) turn pairs (conv[i], conv[i + 1])."""
        return [i for i in range(len(conv) - 1) if conv[i].get("from") in ("human", "user")
                and conv[i + 1].get("from") in ("gpt", "assistant")]

    @staticmethod
    def _question(turn: dict, with_image: bool) -> str:
        """A human turn's text without its ``<image>``, or with the image in front of it."""
        question = turn["value"].replace(IMAGE_TOKEN, "").strip()
        return f"{IMAGE_TOKEN}\n{question}" if with_image else question

    @classmethod
    def shuffled_turns(cls, conv: list[dict], rng: np.random.Generator) -> list[dict]:
        """``conv``'s (human, gpt) pairs in a random order, ``<image>`` in front of the first question (other
        turns, e.g. a system prompt, keep their place in front)."""
        pairs = cls._pairs(conv)
        paired = {j for i in pairs for j in (i, i + 1)}
        out = [t for j, t in enumerate(conv) if j not in paired]
        for n, i in enumerate(rng.permutation(pairs)):
            out += [{**conv[i], "value": cls._question(conv[i], n == 0)}, conv[i + 1]]
        return out

    @classmethod
    def turn_blocks(cls, conv: list[dict]) -> list[list[dict]]:
        """``conv`` as one single-turn conversation per (human, gpt) pair, the image in front of each question
        (other turns, e.g. a system prompt, in front of every one): ``ConversationEncoder.encode_blocks`` input."""
        pairs = cls._pairs(conv)
        paired = {j for i in pairs for j in (i, i + 1)}
        head = [t for j, t in enumerate(conv) if j not in paired]
        return [[*head, {**conv[i], "value": cls._question(conv[i], True)}, conv[i + 1]] for i in pairs]

    @classmethod
    def single_turn(cls, conv: list[dict], rng: np.random.Generator) -> list[dict]:
        """One random (human, gpt) pair of ``conv`` with the image moved in front of its question."""
        pairs = cls._pairs(conv)
        i = pairs[int(rng.integers(len(pairs)))]
        return [{"from": "human", "value": cls._question(conv[i], True)}, conv[i + 1]]

    def __call__(self, raw: dict, ctx) -> dict:
        meta = sample_meta(raw)
        conv = self.conversation(meta, ctx.rng)
        blocks = bool(conv) and isinstance(conv[0], list)  # turn_blocks: single-turn conversations to pack
        enc = self.encoder.encode_blocks(conv) if blocks else self.encoder.encode(conv)
        out: dict[str, Any] = {"__key__": raw["__key__"], "input_ids": enc.input_ids, "targets": enc.targets,
                               "kind": enc.kind}
        if enc.block is not None:
            out.update(block=enc.block, position=enc.position)
        codes = sample_codes(raw)
        if self.use_codes:
            if codes is None:
                raise SampleError(MISSING_CODES, "no codes.npy (mix.image_source: codes)")
            out["codes"] = codes.astype(np.int64)  # (h, w, L_sem)
        else:
            out["image"] = self.transform(sample_pixels(raw, self.transform.decode_min_side), ctx.rng)
        return out


def collate_sequences(samples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest: input_ids / targets / kind / attention_mask (B, T), block / position (B, T) when
    some sample is packed in turn blocks; codes or image stacked."""
    T = max(len(s["input_ids"]) for s in samples)

    def pad(key: str, value: int, dtype) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.pad(s[key], (0, T - len(s[key])), constant_values=value)
                                          for s in samples]).astype(dtype))

    out = {"__key__": [s["__key__"] for s in samples], "input_ids": pad("input_ids", pad_id, np.int64),
           "targets": pad("targets", IGNORE, np.int64), "kind": pad("kind", 0, np.int64),
           "attention_mask": torch.from_numpy(np.stack([np.arange(T) < len(s["input_ids"]) for s in samples]).astype(np.int64))}
    if any("block" in s for s in samples):  # packed turn blocks (plain rows: one block 0, positions 0..T-1)
        samples = [s if "block" in s else {**s, "block": np.zeros(len(s["input_ids"]), np.int64),
                                           "position": np.arange(len(s["input_ids"]))} for s in samples]
        out.update(block=pad("block", 0, np.int64), position=pad("position", 0, np.int64))
    for key in ("codes", "image"):
        if key in samples[0]:
            out[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
    return out


SEQUENCE_KEYS = ("input_ids", "targets", "kind", "attention_mask", "block", "position")


def task_parts(batch: dict) -> list[dict]:
    """A collated batch -> its generation rows and its understanding rows as two batches (absent ones left
    out), each cut to its own longest sequence (the batch is right-padded)."""
    gen = (batch["kind"] == GEN).any(1)  # (B,)
    parts = []
    for rows in (gen, ~gen):
        if not rows.any():
            continue
        T = int(batch["attention_mask"][rows].sum(1).max())
        part = {"__key__": [k for k, r in zip(batch["__key__"], rows.tolist()) if r]}
        for key, v in batch.items():
            if isinstance(v, torch.Tensor):
                part[key] = v[rows][:, :T] if key in SEQUENCE_KEYS else v[rows]
        parts.append(part)
    return parts


def merge_outputs(outs: list[dict], text_weight: float, image_weight: float) -> dict:
    """Forward outputs of a batch's parts -> the whole batch's: text and image CE averaged over all their
    tokens / codes (as one forward of the whole batch would), their weighted sum as the loss."""
    if len(outs) == 1:
        return outs[0]
    out: dict[str, torch.Tensor] = {}
    loss = sum(0.0 * o["loss"] for o in outs)  # keeps every part's graph (all parameters get a gradient)
    for name, count, weight in (("text", "text_tokens", text_weight), ("image", "image_codes", image_weight)):
        have = [o for o in outs if f"{name}_loss" in o]
        if not have:
            continue
        n = sum(o[count] for o in have)
        for k in [k for k in have[0] if k.startswith(f"{name}_") and k != count]:  # loss, acc, per-depth losses
            out[k] = sum(o[k] * o[count] for o in have) / n
        loss = loss + weight * out[f"{name}_loss"]
    out["loss"] = loss
    out["text_tokens"] = sum(o["text_tokens"] for o in outs)
    out["image_codes"] = sum(o["image_codes"] for o in outs)
    return out


def codes_match_tokenizer(shards: list[str], tokenizer_dir: str) -> bool | None:
    """True when every shard's codes came from this tokenizer, False (with the reason raised) when some did
    not, None when no shard has a codes manifest."""
    if all(read_codes_manifest(s) is None for s in shards):
        return None
    fp = tokenizer_fingerprint(tokenizer_dir)
    for s in shards:
        reason = codes_mismatch(s, fp)
        if reason:
            raise ValueError(f"data.sources: {s}: precomputed codes do not fit model.tokenizer {tokenizer_dir}: "
                             f"{reason}; re-run python -m data.precompute_codes")
    return True


class Stage2Task(Task):
    def __init__(self, cfg: Stage2Config):
        self.cfg = cfg
        self._flops: float | None = None

    # ------------------------------------------------------------------ set-up
    def _text_tokenizer(self):
        cfg, out = self.cfg, Path(self.cfg.run.out_dir) / "text_tokenizer"
        llm = cfg.model.llm
        if llm.text_tokenizer or llm.pretrained:
            field_ = "model.llm.text_tokenizer" if llm.text_tokenizer else "model.llm.pretrained"
            return load_text_tokenizer(llm.text_tokenizer or llm.pretrained, field_, llm.trust_remote_code)
        if self.dist.is_main and not (out / "tokenizer.json").is_file():  # train once; a resumed run reuses it
            tok = train_text_tokenizer(corpus(self.shards, cfg.text_tokenizer.max_records), cfg.text_tokenizer.vocab_size)
            tok.save_pretrained(str(out))
        barrier()
        return load_text_tokenizer(out, "text_tokenizer (trained by stage 2)")

    def setup(self, dist: DistInfo) -> None:
        self.dist, self.device = dist, dist.device
        # every path checked before anything is built or written (the text tokenizer is trained from them)
        self.shards = [p for i, s in enumerate(self.cfg.data.sources)
                       for p in existing_shards(s.shards, f"data.sources.{i}.shards")]
        if self.cfg.val.shards:
            existing_shards(self.cfg.val.shards, "val.shards")
        self.build_model()
        self.build_data()

    def load_tokenizer(self, tdir: Path, field_: str) -> None:
        """The frozen stage-1 tokenizer (``self.tokenizer``, ``self.tokenizer_dir``); errors name ``field_``."""
        from tokenizer.model import EvoTokenizer

        if not (tdir / "model.safetensors").is_file():
            raise FileNotFoundError(f"{field_}: {tdir} is not a stage-1 tokenizer export (no model.safetensors); "
                                    "run `make stage1` or point it at one")
        self.tokenizer_dir = tdir
        self.tokenizer = EvoTokenizer.from_pretrained(tdir, with_teacher=False, device=self.device).eval()
        self.tokenizer.requires_grad_(False)
        res = self.cfg.data.image.resolution
        if res != self.tokenizer.cfg.encoder.image_size:
            raise ConfigError("data.image.resolution", f"{res} != the tokenizer's image size "
                                                       f"{self.tokenizer.cfg.encoder.image_size}")

    def build_model(self) -> None:
        """Tokenizer, text tokenizer, a fresh unified model and its optimizer param groups (stage 3 overrides)."""
        cfg = self.cfg
        self.load_tokenizer(Path(cfg.model.tokenizer), "model.tokenizer")
        self.text_tokenizer, added = self._text_tokenizer()
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" and cfg.model.llm.pretrained else None
        self.model = build_unified(cfg.model, self.text_tokenizer, added, self.tokenizer, dtype=dtype,
                                   device=self.device).to(self.device)
        if cfg.model.input_norm:
            self._measure_input_stats()
        if cfg.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.param_groups = self.model.configure_trainable()

    @torch.no_grad()
    def _measure_input_stats(self, n: int = 512) -> None:
        """``model.input_norm``: projector-input statistics of the first ``n`` records of the first training
        shard, read in order (identical on every rank)."""
        codes: list[torch.Tensor] = []
        for batch in eval_loader(self.shards[0], 128, self.cfg.data.image.resolution):
            codes.append(self._codes(batch))
            if sum(len(c) for c in codes) >= n:
                break
        c = torch.cat(codes)[:n]  # (n, h, w, L_sem)
        self.model.set_input_stats(self.tokenizer.semantic_features(c), c[..., : self.model.dims.depth_pix].flatten(1, 2))

    def sequence_sample(self) -> SequenceSample:
        """The map function record -> training sequence (stage 3 builds instruction conversations)."""
        return SequenceSample(self.encoder, self.cfg.mix, self.cfg.data.image, self.use_codes)

    def build_data(self) -> None:
        """Conversation encoder, codes or images, and the length-grouped micro-batches (reads ``cfg.mix``'s
        max_length, image_source and group_batches)."""
        cfg, dist = self.cfg, self.dist
        self.encoder = ConversationEncoder(self.text_tokenizer, self.model.image_positions, cfg.mix.max_length)
        match = codes_match_tokenizer(self.shards, str(self.tokenizer_dir)) if cfg.mix.image_source != "images" else None
        if cfg.mix.image_source == "codes" and match is None:
            raise ConfigError("mix.image_source", "codes requested but the shards have no codes_manifest.json")
        self.use_codes = bool(match)
        self.pad_id = self.model.dims.token_ids["pad"]
        mb, group = cfg.data.batch_size, cfg.mix.group_batches
        loader = StreamingLoader(replace(cfg.data, batch_size=mb * group), rank=dist.rank,
                                 world_size=dist.world_size, map_fn=self.sequence_sample(), collate_fn=list)
        self.loader = loader
        task = (lambda s: bool((s["kind"] == GEN).any())) if cfg.mix.split_tasks else None
        self.batches = LengthGroupedBatches(loader, mb, lambda s: len(s["input_ids"]),
                                            lambda s: collate_sequences(s, self.pad_id), seed=cfg.data.seed,
                                            stratum=task)

    def optimizers(self):
        return {"unified": (self.model, self.cfg.optim.build(self.param_groups, self.device))}

    def micro_batch_size(self) -> int:
        return self.cfg.data.batch_size

    def train_batches(self):
        return iter(self.batches)

    # ------------------------------------------------------------------ step
    def _codes(self, batch: dict) -> torch.Tensor:
        """(B, h, w, L_sem): the batch's precomputed codes, else the frozen tokenizer's codes of its images."""
        codes = batch.get("codes")
        if isinstance(codes, torch.Tensor):
            return codes.to(self.device)
        return self.tokenizer.encode(normalize(batch["image"].to(self.device)))

    def _inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        dev, L = self.device, self.model.dims.depth_pix
        codes = self._codes(batch)
        kind = batch["kind"].to(dev)
        und = (kind == UND).any(1)  # (B,)
        gen = (kind == GEN).any(1)
        und_feats = self.tokenizer.semantic_features(codes[und]) if und.any() else None  # (n_u, N, C)
        gen_codes = codes[gen][..., :L].flatten(1, 2)  # (n_g, N, L_pix)
        out = {"input_ids": batch["input_ids"].to(dev), "attention_mask": batch["attention_mask"].to(dev),
               "targets": batch["targets"].to(dev), "kind": kind, "und_feats": und_feats, "gen_codes": gen_codes}
        if "block" in batch:
            out.update(block=batch["block"].to(dev), position_ids=batch["position"].to(dev))
        return out

    def micro_step(self, engines: dict[str, Any], batch: Any, step: int) -> dict[str, float]:
        engine = engines["unified"]
        parts = task_parts(batch) if self.cfg.mix.split_tasks else [batch]
        with self.forward_context():
            outs = [engine(**self._inputs(part)) for part in parts]
        out = merge_outputs(outs, self.model.cfg.text_weight, self.model.cfg.image_weight)
        engine.backward(out["loss"])
        engine.step()
        metrics = {k: float(v.detach()) for k, v in out.items() if k not in ("text_tokens", "image_codes")}
        metrics["gen_fraction"] = float((batch["kind"] == GEN).any(1).float().mean())
        metrics["pad_fraction"] = 1.0 - sum(float(p["attention_mask"].sum()) for p in parts) / sum(
            p["attention_mask"].numel() for p in parts)
        return metrics

    def count(self, batch: Any) -> dict[str, int]:
        return {"samples": len(batch["__key__"]), "tokens": int(batch["attention_mask"].sum())}

    def flops_per_step(self, batch: Any) -> float:
        """Forward FLOPs of the first micro-batch (FlopCounterMode) per token, x3 for fwd+bwd, x tokens."""
        tokens = int(batch["attention_mask"].sum())
        if self._flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            # its own RNG: dropout here must not shift the training draws (a resumed run counts at another step)
            with torch.random.fork_rng(devices=cuda), torch.no_grad(), FlopCounterMode(display=False) as fc:
                self.model(**self._inputs(batch))
            self._flops = 3.0 * fc.get_total_flops() / max(tokens, 1)
        return self._flops * tokens

    def data_stats(self) -> dict[str, float]:
        return {f"data/skipped/{k}": float(v) for k, v in self.loader.skip_counts().items()}

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "batches" in state:
            self.batches.load_state_dict(state["batches"])

    def meta(self) -> dict:
        return {"model_config": to_dict(self.cfg.model), "dims": self.model.dims.__dict__}

    # ------------------------------------------------------------------ evaluation
    def pipeline(self) -> UnifiedPipeline:
        return UnifiedPipeline(self.model, self.tokenizer, self.text_tokenizer)

    def _val_records(self, limit: int):
        """(codes (n, h, w, L_sem), records) of this rank's share of the held-out shards, in order."""
        v = self.cfg.val
        n = 0
        for batch in eval_loader(v.shards, v.batch_size, self.cfg.data.image.resolution, rank=self.dist.rank,
                                 world_size=self.dist.world_size):
            keep = limit - n
            if keep <= 0:
                break
            codes = self._codes(batch)
            n += len(codes[:keep])
            yield codes[:keep], batch["json"][:keep]

    def _prompts(self) -> list[dict]:
        path = Path(self.cfg.val.geneval_prompts)
        if not path.is_file():
            raise FileNotFoundError(f"val.geneval_prompts: {path} does not exist")
        specs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return specs[: self.cfg.val.max_prompts]

    def evaluate(self, engines: dict[str, Any], step: int) -> dict[str, float]:
        with gathered_parameters(self.model, self.cfg.train.zero_stage):  # sampling reads weights outside forward()
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        from eval.geneval_shapes import score_generations
        from eval.mme import parse_yes_no

        v = self.cfg.val
        self.model.eval()
        pipe, sums = self.pipeline(), {}
        if v.shards:
            per_rank = max(1, v.max_questions // self.dist.world_size)
            images, qs, truth = [], [], []
            for codes, recs in self._val_records(per_rank):
                for c, rec in zip(codes, recs):
                    for pairs in (rec.get("mme") or {}).values():
                        for qa in pairs:
                            images.append(c)
                            qs.append(qa["question"])
                            truth.append(qa["answer"].strip().lower())
                if len(qs) >= per_rank:
                    break
            images, qs, truth = images[:per_rank], qs[:per_rank], truth[:per_rank]
            if qs:
                replies = pipe.answer(torch.stack(images), qs, max_new_tokens=4, batch=v.batch_size)
                parsed = [parse_yes_no(r) for r in replies]
                sums.update({"qa_n": len(qs), "qa_ok": sum(p == t for p, t in zip(parsed, truth)),
                             "qa_other": sum(p == "other" for p in parsed), "qa_yes": sum(p == "yes" for p in parsed)})
        if v.geneval_prompts:
            specs = self._prompts()
            mine = list(range(self.dist.rank, len(specs), self.dist.world_size))
            imgs = pipe.generate_image([specs[i]["prompt"] for i in mine], seed=v.seed, batch=v.batch_size)
            res = score_generations(imgs, specs, seed=v.seed, only=mine)
            for tag, m, s in zip(res["tags"], res["matched"], res["shuffled"]):
                for key, val in ((f"n/{tag}", 1.0), (f"matched/{tag}", float(m)), (f"shuffled/{tag}", float(s))):
                    sums[key] = sums.get(key, 0.0) + val
        self.model.train()
        tot = all_reduce_sums(sums) if sums else {}
        out: dict[str, float] = {}
        if tot.get("qa_n"):
            out.update({"val/yes_no_acc": tot["qa_ok"] / tot["qa_n"], "val/yes_ratio": tot["qa_yes"] / tot["qa_n"],
                        "val/unparsed": tot["qa_other"] / tot["qa_n"], "val/questions": tot["qa_n"]})
        tags = sorted(k[2:] for k in tot if k.startswith("n/"))
        if tags:
            for name in ("matched", "shuffled"):
                per = {t: tot[f"{name}/{t}"] / tot[f"n/{t}"] for t in tags}
                out.update({f"val/geneval_{name}/{t}": s for t, s in per.items()})
                out[f"val/geneval_{name}"] = float(np.mean(list(per.values())))
            m, s = out["val/geneval_matched"], out["val/geneval_shuffled"]
            out["val/geneval_ratio"] = m / s if s > 0 else (math.inf if m > 0 else 0.0)
        return out

    def images(self, engines: dict[str, Any], step: int) -> dict[str, Image.Image]:
        if not self.cfg.val.geneval_prompts:
            return {}
        zero3 = self.cfg.train.zero_stage == 3
        with gathered_parameters(self.model, self.cfg.train.zero_stage):  # collective: every rank enters
            images = self._images() if self.dist.is_main or zero3 else {}  # ZeRO-3: every rank runs the forwards
        return images if self.dist.is_main else {}

    def _images(self) -> dict[str, Image.Image]:
        v = self.cfg.val
        specs = self._prompts()
        specs = specs[:: max(1, len(specs) // v.grid_images)][: v.grid_images]
        self.model.eval()
        imgs = self.pipeline().generate_image([s["prompt"] for s in specs], seed=v.seed, batch=v.batch_size)
        self.model.train()
        cols = 8
        rows = [np.concatenate(imgs[i: i + cols] + [np.zeros_like(imgs[0])] * (cols - len(imgs[i: i + cols])), 1)
                for i in range(0, len(imgs), cols)]
        return {"val/generated": Image.fromarray(np.concatenate(rows, 0))}

    def export_model(self):
        """The module to save, on every rank inside the parameter gather (stage 3: LoRA merged)."""
        return self.model

    def export(self, engines: dict[str, Any], out_dir: Path) -> None:
        with gathered_parameters(self.model, self.cfg.train.zero_stage):
            model = self.export_model()
            if self.dist.is_main:
                model.save_pretrained(out_dir / "unified", tokenizer_ref=tokenizer_reference(self.tokenizer_dir),
                                      text_tokenizer=self.text_tokenizer)
