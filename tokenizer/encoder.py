"""Vision towers (SigLIP/SigLIP2 via Hugging Face) and the EvoTok shared encoder.

``VisionTower`` wraps a Hugging Face vision model and returns one hidden layer as a token grid; it serves
both as the fine-tuned shared encoder and as the frozen semantic teacher. ``Encoder`` = tower + the
pre-quant MLP (EvoTok's ``encode_task_layer``) down to the D-dim latent that the residual quantiser reads.

Input convention: images in [-1, 1], (B, 3, H, W). SigLIP's own preprocessing is
``(x / 255 - 0.5) / 0.5``, i.e. it maps [0, 255] to [-1, 1]; on our [-1, 1] input it is the identity, so no
scaling layer is applied (the official release applies ``((x + 1) * 127.5).clamp(0, 255) / 255`` then
``(x - 0.5) / 0.5``, which only clamps to [-1, 1]).

Pretrained weights come only from a local directory (``VisionTowerConfig.pretrained``, config.json +
weights); nothing is downloaded and no remote code is run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from tokenizer.config import VisionTowerConfig
from unimllm.config import ConfigError

# Architecture keys of a SigLIP vision config that our VisionTowerConfig fields (plus fixed defaults) must
# reproduce for a saved tokenizer to rebuild the tower without the pretrained directory.
_ARCH_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "vision_use_head",
)


def load_hf_config(cfg: VisionTowerConfig, config_key: str = "encoder"):
    """The Hugging Face vision config a tower is built from: the pretrained directory's when
    ``cfg.pretrained`` is set (a composite config such as SigLIP's text+vision gives its ``vision_config``),
    else one built from ``cfg``'s fields. Errors name ``<config_key>.pretrained``."""
    from transformers import AutoConfig

    if not cfg.pretrained:
        return AutoConfig.for_model(
            cfg.model_type, image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
        )
    path = Path(cfg.pretrained)
    key = f"{config_key}.pretrained"
    if not path.is_dir():
        raise ConfigError(key, f"{cfg.pretrained} does not exist (must be a local directory; nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise ConfigError(key, f"{cfg.pretrained} has no config.json (expected a Hugging Face model directory)")
    hf = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    return getattr(hf, "vision_config", None) or hf


def tower_config_from_hf(hf_config, feature_layer: int, config_key: str = "encoder") -> VisionTowerConfig:
    """A ``VisionTowerConfig`` (``pretrained`` empty) whose random-init build has ``hf_config``'s architecture,
    so a saved tokenizer rebuilds without the pretrained directory. Raises ConfigError naming the keys our
    fields cannot express (e.g. a non-default activation)."""
    if hf_config.model_type != "siglip_vision_model":
        raise ConfigError(f"{config_key}.pretrained",
                          f"model_type {hf_config.model_type!r} cannot be saved standalone (siglip_vision_model)")
    out = VisionTowerConfig(
        pretrained="", model_type=hf_config.model_type, image_size=int(hf_config.image_size),
        patch_size=int(hf_config.patch_size), hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size, feature_layer=feature_layer,
    )
    rebuilt = load_hf_config(out, config_key)
    differ = [k for k in _ARCH_KEYS if getattr(rebuilt, k, None) != getattr(hf_config, k, None)]
    if differ:
        detail = ", ".join(f"{k}={getattr(hf_config, k, None)!r}" for k in differ)
        raise ConfigError(f"{config_key}.pretrained", f"architecture not expressible by VisionTowerConfig ({detail})")
    return out


def _build_hf_model(cfg: VisionTowerConfig, config_key: str) -> nn.Module:
    from transformers import AutoModel

    hf_config = load_hf_config(cfg, config_key)
    if not cfg.pretrained:
        return AutoModel.from_config(hf_config, attn_implementation="sdpa", trust_remote_code=False)
    return AutoModel.from_pretrained(
        cfg.pretrained, config=hf_config, local_files_only=True, trust_remote_code=False,
        dtype=torch.float32, attn_implementation="sdpa",
    )


class VisionTower(nn.Module):
    """A Hugging Face vision transformer returning its ``cfg.feature_layer`` hidden states as a token grid.

    ``feature_layer`` indexes ``hidden_states`` as Hugging Face returns them (entry 0 = patch embeddings,
    entry i = output of layer i; -2 = penultimate, EvoTok's choice). Only the layers needed for that entry
    are run; the rest (later layers, ``post_layernorm``, the pooling ``head``) are kept for state-dict
    compatibility and frozen. ``frozen=True`` freezes everything and pins eval mode (the teacher).

    Args:
        cfg: tower config (``cfg.pretrained``: local HF directory, else random init from the fields).
        config_key: dotted config path used in error messages (e.g. ``tokenizer.teacher``).
        frozen: freeze all parameters and stay in eval mode.
    """

    def __init__(self, cfg: VisionTowerConfig, *, config_key: str = "encoder", frozen: bool = False):
        super().__init__()
        self.cfg, self.config_key, self.frozen = cfg, config_key, frozen
        self.model = _build_hf_model(cfg, config_key)
        hf = self.model.config
        self.hidden_size: int = hf.hidden_size
        self.image_size: int = int(hf.image_size)
        self.grid_size: int = int(hf.image_size) // int(hf.patch_size)
        n_layers = hf.num_hidden_layers
        n_run = cfg.feature_layer if cfg.feature_layer >= 0 else n_layers + 1 + cfg.feature_layer
        if not 0 <= n_run <= n_layers:
            raise ConfigError(f"{config_key}.feature_layer",
                              f"{cfg.feature_layer} is out of range for {n_layers} layers")
        self.num_run_layers = n_run
        # Fast path (SigLIP family): run embeddings + the first n_run layers only.
        self._truncated = hasattr(self.model, "embeddings") and hasattr(getattr(self.model, "encoder", None), "layers")
        self._freeze_unused()
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def _freeze_unused(self) -> None:
        unused = ["post_layernorm.", "head."]
        if self._truncated:
            unused += [f"encoder.layers.{i}." for i in range(self.num_run_layers, len(self.model.encoder.layers))]
        for name, p in self.model.named_parameters():
            if any(name.startswith(u) for u in unused):
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> VisionTower:
        return super().train(mode and not self.frozen)

    def resolved_config(self) -> VisionTowerConfig:
        """The config that rebuilds this tower's architecture without ``pretrained`` (for saved checkpoints)."""
        return tower_config_from_hf(self.model.config, self.cfg.feature_layer, self.config_key)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> features (B, h, w, C) of the chosen hidden layer."""
        B = images.shape[0]
        if self._truncated:
            h = self.model.embeddings(images)  # (B, N, C)
            for layer in self.model.encoder.layers[: self.num_run_layers]:
                h = layer(h, None)  # (B, N, C)
        else:
            h = self.model(pixel_values=images, output_hidden_states=True).hidden_states[self.cfg.feature_layer]
        N = h.shape[1]
        g = self.grid_size
        if N != g * g:
            raise ValueError(f"{self.config_key}: got {N} tokens, expected a {g}x{g} grid (image size {self.image_size})")
        return h.reshape(B, g, g, -1)  # (B, h, w, C)


class Encoder(nn.Module):
    """EvoTok shared encoder: a (fine-tuned) vision tower, then Linear(C, C) -> Tanh -> Linear(C, D).

    Args:
        cfg: encoder tower config.
        latent_dim: D, the residual quantiser's code dimension.
        config_key: dotted config path for error messages.
    """

    def __init__(self, cfg: VisionTowerConfig, latent_dim: int, *, config_key: str = "encoder"):
        super().__init__()
        self.tower = VisionTower(cfg, config_key=config_key)
        C = self.tower.hidden_size
        self.pre_quant = nn.Sequential(nn.Linear(C, C), nn.Tanh(), nn.Linear(C, latent_dim))
        for m in self.pre_quant:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def grid_size(self) -> int:
        return self.tower.grid_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> latent z (B, h, w, D)."""
        feats = self.tower(images)  # (B, h, w, C)
        return self.pre_quant(feats)  # (B, h, w, D)
