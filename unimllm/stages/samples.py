"""Records -> training sequences for stages 2 and 3: which task a record becomes (understanding or generation),
how its turns are arranged, and its image as precomputed codes or pixels (:class:`SequenceSample`, the loader's
map function)."""

from __future__ import annotations

from typing import Any

import numpy as np

from data.config import ImageConfig
from data.schema import SampleError, sample_codes, sample_meta, sample_pixels
from data.transforms import ImageTransform
from llm.conversation import ConversationEncoder
from llm.text_tokenizer import IMAGE_TOKEN
from unimllm.stages.alignment_config import MixConfig

MISSING_CODES, BAD_RECORD = "missing_codes", "bad_record"  # skip reasons, counted by the loader


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
