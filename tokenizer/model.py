"""EvoTokenizer: the whole EvoTok image tokenizer as one pure ``nn.Module`` built from ``TokenizerConfig``.

    images (B, 3, H, W) in [-1, 1]
      -> Encoder (SigLIP tower, penultimate layer, + MLP)       z      (B, h, w, D)
      -> ResidualQuantizer (L_sem stages)                        codes  (B, h, w, L_sem)
           z_q_pix = q_{<=L_pix} (straight-through) -> PixelDecoder    -> recon    (B, 3, H, W)
           z_q_sem = q_{<=L_sem} (straight-through) -> SemanticDecoder -> sem_pred (B, h*w, C_t)
    frozen teacher tower (SigLIP, same layer)                    target (B, h*w, C_t)

Losses live in ``tokenizer.losses``; parallelism and optimisers elsewhere (no DeepSpeed, no ranks here).
A saved tokenizer is a directory with ``config.json`` (the ``TokenizerConfig``, towers resolved to their
actual architecture with ``pretrained`` cleared) and ``model.safetensors``; it loads without the
pretrained SigLIP directories and without DeepSpeed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from tokenizer.config import TokenizerConfig
from tokenizer.decoders import PixelDecoder, SemanticDecoder
from tokenizer.encoder import Encoder, VisionTower, load_hf_config, tower_config_from_hf
from tokenizer.quantizer import QuantizerOutput, ResidualQuantizer
from unimllm.config import ConfigError, from_dict, to_dict, validate
from unimllm.files import atomic_path, atomic_write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def is_tokenizer_dir(directory: str | Path) -> bool:
    """Whether ``directory`` looks like a ``save_pretrained`` directory: ``model.safetensors`` and a
    ``config.json`` describing a tokenizer (it has a ``quantizer`` section)."""
    folder = Path(directory)
    if not ((folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()):
        return False
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
    except ValueError:
        return False
    return isinstance(cfg, dict) and "quantizer" in cfg


def skip_weight_init():
    """Context that skips random weight init (torch.nn.init and HF ``init_weights``) while building a model
    whose weights are loaded right after: SigLIP-L's init alone takes ~10 s per tower on CPU."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # moved in another transformers version: just pay for the init
        return contextlib.nullcontext()
    return no_init_weights()


class TokenizerOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds the tensors of tuples (its backward hooks) but
    not of dataclasses. One training forward."""

    recon: torch.Tensor
    """(B, 3, H, W) pixel-decoder output from z_q_pix (unbounded; targets are in [-1, 1])."""
    sem_pred: torch.Tensor
    """(B, N, C_t) semantic-decoder output from z_q_sem (N = h*w, C_t = teacher width)."""
    codes: torch.Tensor
    """(B, h, w, L_sem) long code indices."""
    commit_loss: torch.Tensor
    """() cumulative commitment loss over all L_sem depths (unweighted)."""
    z: torch.Tensor
    """(B, h, w, D) pre-quant latent."""
    quant: QuantizerOutput
    """The quantiser's full output (usage, perplexity, restarts, cumulative sums)."""


class EvoTokenizer(nn.Module):
    """Encoder + residual quantiser + pixel and semantic decoders + frozen teacher.

    Args:
        cfg: the tokenizer config (``encoder.pretrained`` / ``teacher.pretrained``: local SigLIP directories,
            else random init).
        with_teacher: build the teacher. Only training needs it; understanding/generation consumers can
            skip it (``teacher_features`` then raises) and save its memory.
        config_key: where ``cfg`` sits in the stage config, for error messages
            (``<config_key>.encoder.pretrained: ... does not exist``).
    """

    def __init__(self, cfg: TokenizerConfig, *, with_teacher: bool = True, config_key: str = "tokenizer"):
        super().__init__()
        validate(cfg, config_key)
        self.cfg, self.config_key = cfg, config_key
        D = cfg.quantizer.dim
        self.encoder = Encoder(cfg.encoder, D, config_key=f"{config_key}.encoder")
        self.quantizer = ResidualQuantizer(cfg.quantizer)
        self.pixel_decoder = PixelDecoder(cfg.pixel_decoder, D)
        if with_teacher:
            self.teacher: VisionTower | None = VisionTower(cfg.teacher, config_key=f"{config_key}.teacher",
                                                           frozen=True)
            t_dim, t_grid = self.teacher.hidden_size, self.teacher.grid_size
        else:
            self.teacher = None
            t_hf = load_hf_config(cfg.teacher, f"{config_key}.teacher")
            t_dim, t_grid = t_hf.hidden_size, int(t_hf.image_size) // int(t_hf.patch_size)
        g = self.encoder.grid_size
        if t_grid != g:
            raise ConfigError(f"{config_key}.teacher", f"teacher grid {t_grid}x{t_grid} != encoder grid {g}x{g}")
        ups = 2 ** (len(cfg.pixel_decoder.channel_mult) - 1)
        if g * ups != self.encoder.tower.image_size:
            raise ConfigError(f"{config_key}.pixel_decoder.channel_mult",
                              f"{g}x{g} grid x {ups} != encoder image size {self.encoder.tower.image_size}")
        self.semantic_decoder = SemanticDecoder(cfg.semantic_decoder, D, t_dim, grid_size=g)

    # ------------------------------------------------------------------ training

    def train(self, mode: bool = True) -> EvoTokenizer:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen teacher: always eval
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the tokenizer optimiser updates: requires_grad and not the teacher's (the quantiser has
        only EMA buffers; the encoder's unused tail layers are frozen)."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """images (B, 3, H, W) in [-1, 1] -> reconstruction, semantic prediction, codes, commitment loss.
        In training mode (grad enabled) the quantiser updates its EMA codebooks."""
        z = self.encoder(images)  # (B, h, w, D)
        q = self.quantizer(z)  # codes (B, h, w, L_sem), z_q_* (B, h, w, D)
        recon = self.pixel_decoder(q.z_q_pix)  # (B, 3, H, W)
        sem_pred = self.semantic_decoder(q.z_q_sem)  # (B, N, C_t)
        return TokenizerOutput(recon=recon, sem_pred=sem_pred, codes=q.codes, commit_loss=q.commit_loss, z=z,
                               quant=q)

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's target features (B, N, C_t) for images (B, 3, H, W) in [-1, 1]."""
        if self.teacher is None:
            raise RuntimeError("this EvoTokenizer was built with with_teacher=False")
        return self.teacher(images).flatten(1, 2)  # (B, N, C_t)

    # ------------------------------------------------------------------ inference (no grad, no EMA updates)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, h, w, L_sem)."""
        return self.quantizer.encode(self.encoder(images))  # (B, h, w, L_sem)

    @torch.no_grad()
    def decode_pixels(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """codes (B, h, w, >= depth) -> images (B, 3, H, W) decoded from the first ``depth`` stages
        (default L_pix, what the pixel decoder was trained on). Unbounded; clamp to [-1, 1] to display."""
        depth = self.cfg.quantizer.depth_pix if depth is None else depth
        z_q = self.quantizer.decode(codes, depth)  # (B, h, w, D) float32
        dtype = self.pixel_decoder.conv_out.weight.dtype
        return self.pixel_decoder(z_q.to(dtype))  # (B, 3, H, W)

    @torch.no_grad()
    def semantic_features(self, codes_or_images: torch.Tensor) -> torch.Tensor:
        """What the LLM's understanding path reads: semantic-decoder features (B, N, C_t) of f_sem, the sum of
        all L_sem stages. Accepts codes (B, h, w, L_sem) (integer dtype) or images (B, 3, H, W) in [-1, 1]."""
        x = codes_or_images
        codes = x if not torch.is_floating_point(x) else self.encode(x)  # (B, h, w, L_sem)
        z_q = self.quantizer.decode(codes, self.cfg.quantizer.depth_sem)  # (B, h, w, D)
        dtype = self.semantic_decoder.pos_embed.dtype
        return self.semantic_decoder(z_q.to(dtype))  # (B, N, C_t)

    # ------------------------------------------------------------------ save / load

    def resolved_config(self) -> TokenizerConfig:
        """``cfg`` with both towers described by their actual architecture and ``pretrained`` cleared, so the
        saved directory rebuilds without the SigLIP directories."""
        teacher = (self.teacher.resolved_config() if self.teacher is not None else
                   tower_config_from_hf(load_hf_config(self.cfg.teacher, f"{self.config_key}.teacher"),
                                        self.cfg.teacher.feature_layer, f"{self.config_key}.teacher"))
        return dataclasses.replace(self.cfg, encoder=self.encoder.tower.resolved_config(), teacher=teacher)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (all weights and quantiser buffers; the teacher too
        when built) to ``directory``; returns it."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.resolved_config()
        state, seen = {}, set()
        for k, v in self.state_dict().items():
            v = v.detach().cpu().contiguous()
            ptr = v.untyped_storage().data_ptr()
            state[k] = v.clone() if ptr in seen else v  # safetensors refuses shared storage
            seen.add(ptr)
        with atomic_path(out / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "model": type(self).__name__})
        atomic_write_json(out / CONFIG_NAME, to_dict(cfg))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, with_teacher: bool = True,
                        device: str | torch.device = "cpu") -> EvoTokenizer:
        """Rebuild from a ``save_pretrained`` directory (safetensors only); returned in eval mode."""
        from safetensors.torch import load_file

        src = Path(directory)
        cfg_path, weights = src / CONFIG_NAME, src / WEIGHTS_NAME
        for p in (cfg_path, weights):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found (expected an EvoTokenizer.save_pretrained directory)")
        cfg = from_dict(TokenizerConfig, json.loads(cfg_path.read_text()), source=str(cfg_path))
        with skip_weight_init():  # every parameter and persistent buffer is overwritten below (strict)
            model = cls(cfg, with_teacher=with_teacher)
        state = load_file(str(weights))
        if not with_teacher:
            state = {k: v for k, v in state.items() if not k.startswith("teacher.")}
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            hint = " (saved without a teacher? load with with_teacher=False)" if any(
                k.startswith("teacher.") for k in missing) else ""
            raise ValueError(f"{weights}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}{hint}")
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()
