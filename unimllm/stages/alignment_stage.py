"""Stage 2 as a trainer Task: align a causal LM to the frozen EvoTok tokenizer for understanding AND generation.

One engine ("unified": LLM + projectors + depth transformer; the tokenizer stays outside, frozen). Each
record becomes an understanding sample (its conversation, ``<image>`` in a user turn) or a generation
sample (user: its prompt, assistant: ``<image>``), mixed by ``mix.generation_ratio``; generation prompts
are dropped to "" with ``mix.uncond_prob`` so classifier-free guidance has an unconditional model.
Image codes come from the shards' ``codes.npy`` (``python -m unimllm.stages.precompute_codes``) or the tokenizer on
the fly. Validation on shapes-world held-out data: yes/no accuracy on MME-style questions, and GenEval
prompts generated and scored against their own and against shuffled prompts (the chance control).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data.corpus import corpus
from data.grouping import LengthGroupedBatches
from data.loader import StreamingLoader, eval_loader, existing_shards
from data.transforms import normalize
from llm.batch import collate_sequences, pack_sequences, task_parts
from llm.conversation import GEN, UND, ConversationEncoder
from llm.model import build_unified
from llm.text_tokenizer import load_text_tokenizer, train_text_tokenizer
from unimllm.config import ConfigError, to_dict
from unimllm.distributed import DistInfo, all_reduce_sums, barrier, gathered_parameters
from unimllm.stages.alignment_config import Stage2Config
from unimllm.stages.artifacts import tokenizer_reference
from unimllm.stages.pipeline import UnifiedPipeline
from unimllm.stages.precompute_codes import codes_match_tokenizer
from unimllm.stages.samples import SequenceSample
from unimllm.trainer import Task


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
                                            self._collate, seed=cfg.data.seed,
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

    def _collate(self, samples: list[dict]) -> dict:
        mix = self.cfg.mix
        if mix.pack:
            return pack_sequences(samples, self.pad_id, mix.pack_tokens, mix.split_tasks)
        return collate_sequences(samples, self.pad_id)

    def _inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        dev, L = self.device, self.model.dims.depth_pix
        codes = self._codes(batch)
        kind = batch["kind"].to(dev)
        if "image_role" in batch:  # packed rows: one image per sample, the samples in row-major order
            role = batch["image_role"].to(dev)
            und, gen = role == UND, role == GEN  # (n,)
        else:
            und = (kind == UND).any(1)  # (B,)
            gen = (kind == GEN).any(1)
        und_feats = self.tokenizer.semantic_features(codes[und]) if und.any() else None  # (n_u, N, C)
        gen_codes = codes[gen][..., :L].flatten(1, 2)  # (n_g, N, L_pix)
        out = {"input_ids": batch["input_ids"].to(dev), "attention_mask": batch["attention_mask"].to(dev),
               "targets": batch["targets"].to(dev), "kind": kind, "und_feats": und_feats, "gen_codes": gen_codes}
        if "block" in batch:
            out.update(block=batch["block"].to(dev), position_ids=batch["position"].to(dev))
        if "segment" in batch:
            out["segment"] = batch["segment"].to(dev)
        return out

    def micro_step(self, engines: dict[str, Any], batch: Any, step: int) -> dict[str, float]:
        engine = engines["unified"]
        parts = task_parts(batch) if self.cfg.mix.split_tasks else [batch]
        with self.forward_context():
            outs = [engine(**self._inputs(part)) for part in parts]
        out = self.model.merge_parts(outs)
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
