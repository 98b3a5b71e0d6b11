"""Inference on a unified model: ``generate_image`` and ``answer``, deterministic under a seed.

    pipe = UnifiedPipeline.from_pretrained("runs/stage2/tiny/export")   # no DeepSpeed needed
    images = pipe.generate_image(["a photo of a red circle"], seed=0)  # list of uint8 (H, W, 3)
    pipe.answer([images[0]], ["Is there a red circle in the image? Please answer yes or no."])

The export references its frozen EvoTok tokenizer by path and sha256; a tokenizer whose weights differ
is refused (pass ``tokenizer_dir`` when the directory moved). :func:`resolve_tokenizer` is that check, shared
by the pipeline, the evaluation runner and the ``unimllm`` CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.config import ImageConfig
from data.transforms import ImageTransform, denormalize, normalize
from llm.config import SamplerConfig
from llm.conversation import ConversationEncoder
from llm.model import TEXT_TOKENIZER_DIR, UnifiedModel, read_meta
from llm.sampling import sample_codes
from llm.text_tokenizer import load_text_tokenizer
from unimllm.stages.artifacts import ResolvedTokenizer, resolve_tokenizer


class UnifiedPipeline:
    """A unified model + its frozen EvoTok tokenizer + its text tokenizer, in eval mode."""

    def __init__(self, model: UnifiedModel, tokenizer, text_tokenizer, sampler: SamplerConfig | None = None):
        self.model, self.tokenizer, self.text_tokenizer = model, tokenizer, text_tokenizer
        self.sampler = sampler or model.cfg.sampler
        self.encoder = ConversationEncoder(text_tokenizer, model.image_positions, max_length=1 << 30)
        size = tokenizer.cfg.encoder.image_size
        self.transform = ImageTransform(ImageConfig(resolution=size, crop="center"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, tokenizer_dir: str | Path | ResolvedTokenizer | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> UnifiedPipeline:
        """Load a unified export and its tokenizer. ``tokenizer_dir``: where the tokenizer is when the export's
        reference moved, or a :class:`ResolvedTokenizer` already checked (not hashed again)."""
        from tokenizer.model import EvoTokenizer

        src = Path(directory)
        tok_ref = tokenizer_dir if isinstance(tokenizer_dir, ResolvedTokenizer) else resolve_tokenizer(src, tokenizer_dir)
        if tok_ref.sha256 != read_meta(src)["tokenizer"]["sha256"]:
            raise ValueError(f"tokenizer_dir: {tok_ref.path} is not the tokenizer {src} was trained with (resolved "
                             "for another export)")
        model = UnifiedModel.from_pretrained(src, device=device, dtype=dtype).eval()
        tok = EvoTokenizer.from_pretrained(tok_ref.path, with_teacher=False, device=device)
        text_tok, _ = load_text_tokenizer(src / TEXT_TOKENIZER_DIR, "text_tokenizer")
        return cls(model, tok, text_tok)

    @property
    def device(self) -> torch.device:
        return self.model.codebooks.device

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_codes(self, prompts: list[str], *, seed: int = 0, batch: int = 16, cache: bool = True,
                       seeds: list[int] | None = None, **overrides: Any) -> torch.Tensor:
        """Codes (n, grid, grid, L_pix) for ``prompts``; ``overrides``: cfg_scale, temperature, top_k, top_p.
        Sample k draws from its own generator, seeded ``seeds[k]`` when given, else from ``seed`` and k."""
        import dataclasses

        sampler = dataclasses.replace(self.sampler, **{k: v for k, v in overrides.items() if v is not None})
        sampler.validate()
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts")
        g = self.model.dims.grid
        uncond = self.encoder.generation_prompt("")
        out = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i: i + batch]
            gens = [torch.Generator().manual_seed(int(seeds[i + j]) if seeds is not None else seed * 1_000_003 + i + j)
                    for j in range(len(chunk))]
            ids = [self.encoder.generation_prompt(p) for p in chunk]
            codes = sample_codes(self.model, ids, uncond, sampler, gens, cache=cache)  # (b, N, L)
            out.append(codes.view(len(chunk), g, g, -1))
        return torch.cat(out)

    @torch.no_grad()
    def generate_image(self, prompts: list[str], cfg_scale: float | None = None, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None, seed: int = 0, batch: int = 16,
                       cache: bool = True, seeds: list[int] | None = None) -> list[np.ndarray]:
        """Images (uint8 (H, W, 3)) for ``prompts``; unset sampler arguments use the checkpoint's defaults;
        ``seeds``: one generator seed per image (see generate_codes)."""
        codes = self.generate_codes(prompts, seed=seed, batch=batch, cache=cache, seeds=seeds, cfg_scale=cfg_scale,
                                    temperature=temperature, top_k=top_k, top_p=top_p)
        images = []
        for i in range(0, len(codes), batch):
            images += list(denormalize(self.tokenizer.decode_pixels(codes[i: i + batch])))
        return images

    # ------------------------------------------------------------------ understanding
    def image_codes(self, images: list[Any]) -> torch.Tensor:
        """uint8 arrays / PIL images (center-cropped to the tokenizer's size) -> codes (n, h, w, L_sem)."""
        from PIL import Image

        arr = np.stack([self.transform(im.convert("RGB") if isinstance(im, Image.Image) else np.asarray(im), None)
                        for im in images])  # (n, R, R, 3) uint8
        x = normalize(torch.from_numpy(arr).to(self.device))
        return self.tokenizer.encode(x)

    @torch.no_grad()
    def answer(self, images: list[Any] | torch.Tensor, questions: list[str], *, max_new_tokens: int = 32,
               batch: int = 16, temperature: float = 0.0, seed: int = 0) -> list[str]:
        """Replies to ``questions`` about ``images`` (uint8 arrays / PIL, or codes (n, h, w, L_sem)), greedy
        unless temperature > 0 (then sampled under ``seed``)."""
        codes = images if isinstance(images, torch.Tensor) else self.image_codes(list(images))
        replies: list[str] = []
        for i in range(0, len(questions), batch):
            feats = self.tokenizer.semantic_features(codes[i: i + batch].to(self.device))  # (b, N, C)
            if temperature > 0:
                torch.manual_seed(seed + i)
            replies += generate_replies(self.model, self.text_tokenizer,
                                        [self.encoder.understanding_prompt(q) for q in questions[i: i + batch]],
                                        und_feats=feats, max_new_tokens=max_new_tokens, temperature=temperature)
        return replies


@torch.no_grad()
def generate_replies(model: UnifiedModel, text_tokenizer, prompts: list[tuple[list[int], np.ndarray]], *,
                     und_feats: torch.Tensor | None = None, gen_codes: torch.Tensor | None = None,
                     max_new_tokens: int = 32, temperature: float = 0.0) -> list[str]:
    """Text replies continuing ``prompts`` (ids, kinds) from ``ConversationEncoder.reply_prompt``, left-padded
    into one batch; their image slots take ``und_feats`` (n_u, N, C) / ``gen_codes`` (n_g, N, L_pix) in row
    order. Greedy unless temperature > 0 (seed the global generator first)."""
    pad, eos, dev = model.dims.token_ids["pad"], model.dims.token_ids["eos"], model.codebooks.device
    T = max(len(ids) for ids, _ in prompts)
    ids = torch.tensor([[pad] * (T - len(x)) + x for x, _ in prompts], device=dev)  # (b, T)
    kind = torch.tensor(np.stack([np.pad(k, (T - len(k), 0)) for _, k in prompts]), device=dev)  # (b, T), TEXT pads
    am = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x, _ in prompts], device=dev)  # (b, T)
    emb = model.embed(ids, kind, und_feats=und_feats, gen_codes=gen_codes)  # (b, T, H)
    out = model.llm.generate(inputs_embeds=emb, attention_mask=am, max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0, temperature=temperature or None, top_k=None, top_p=None,
                             eos_token_id=eos, pad_token_id=pad)
    return [r.strip() for r in text_tokenizer.batch_decode(out, skip_special_tokens=True)]
