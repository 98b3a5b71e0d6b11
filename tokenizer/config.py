"""EvoTok tokenizer model config: encoder, residual quantiser, pixel and semantic decoders, teacher.

Presets: ``tiny`` (trains on a CPU in minutes on the 64-px shapes world) and ``base-256`` (the reference
recipe: SigLIP2-L/16-256 encoder and teacher, 16x16 grid, L_pix=4, L_sem=16, 32768 codes x 32-d).
Training knobs (losses, optimiser, schedule) live in the stage-1 config, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unimllm.config import ConfigError


@dataclass
class VisionTowerConfig:
    """A Hugging Face vision tower giving a token grid (SigLIP/SigLIP2 by default)."""

    pretrained: str = ""
    """Local directory of a pretrained HF vision model (config.json + weights). Empty: random init from
    the fields below (tests, smoke runs). Never downloaded from a hub."""
    model_type: Literal["siglip_vision_model"] = "siglip_vision_model"
    """HF model type used for random init (the pretrained directory's config.json wins when given)."""
    image_size: int = 64
    """Input side in pixels."""
    patch_size: int = 8
    """Patch side: the token grid is (image_size / patch_size)^2."""
    hidden_size: int = 128
    """Transformer width."""
    num_layers: int = 2
    """Transformer depth."""
    num_heads: int = 4
    """Attention heads."""
    intermediate_size: int = 512
    """MLP hidden width."""
    feature_layer: int = -2
    """Which hidden state is the output (-2 = penultimate, as EvoTok); layers after it are frozen."""

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError("image_size", f"{self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("hidden_size", f"{self.hidden_size} is not divisible by num_heads {self.num_heads}")


@dataclass
class QuantizerConfig:
    """Residual VQ: L_sem stages, each with its own EMA codebook."""

    codebook_size: int = 512
    """Codes per stage (K)."""
    dim: int = 32
    """Code / latent dimension (D)."""
    depth_sem: int = 8
    """L_sem: total residual stages (the semantic decoder reads the sum of all of them)."""
    depth_pix: int = 4
    """L_pix: the pixel decoder reads the sum of the first L_pix stages."""
    decay: float = 0.99
    """EMA decay of cluster sizes and code sums."""
    eps: float = 1e-5
    """Laplace smoothing of EMA cluster sizes."""
    warmup_steps: int = 0
    """Steps during which code sums are not EMA-updated (cluster sizes and restarts still are)."""
    restart_dead: bool = True
    """Replace codes whose EMA cluster size falls below dead_threshold by current residuals."""
    dead_threshold: float = 1.0
    """EMA cluster size under which a code counts as dead."""
    search_memory_mb: int = 64
    """Memory budget of one chunk of the nearest-code distance matrix (the full N x K is never built)."""
    search: Literal["auto", "chunked", "fused"] = "auto"
    """Nearest-code search: ``chunked`` (torch, any device), ``fused`` (the Triton kernel of
    tokenizer.fused_search: no N x K traffic; CUDA, or the CPU under TRITON_INTERPRET=1), ``auto`` = fused on CUDA
    when Triton is installed and the code dimension suits it, else chunked."""

    def validate(self) -> None:
        if not 1 <= self.depth_pix <= self.depth_sem:
            raise ConfigError("depth_pix", f"need 1 <= depth_pix ({self.depth_pix}) <= depth_sem ({self.depth_sem})")
        if not 0.0 < self.decay < 1.0:
            raise ConfigError("decay", f"must be in (0, 1), got {self.decay}")
        if self.codebook_size < 2 or self.dim < 1:
            raise ConfigError("codebook_size", "need codebook_size >= 2 and dim >= 1")


@dataclass
class PixelDecoderConfig:
    """VQGAN/LlamaGen-style CNN decoder from the f_pix map to pixels."""

    z_channels: int = 32
    """Channels after the 1x1 post-quant conv."""
    channels: int = 32
    """Base channel count (ch)."""
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    """Per-level multipliers, highest resolution first; len - 1 upsampling steps (x2 each)."""
    num_res_blocks: int = 0
    """Residual blocks per level (the decoder uses num_res_blocks + 1, as VQGAN)."""
    attn_lowest: bool = True
    """Self-attention in the mid block and at the lowest resolution."""
    dropout: float = 0.0
    """Dropout in residual blocks."""


@dataclass
class SemanticDecoderConfig:
    """Small ViT from the f_sem map to the teacher's feature width."""

    width: int = 128
    """Transformer width."""
    depth: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    head_dim: int = 0
    """Per-head width; 0 = width // num_heads. EvoTok's BEiT-style decoder uses 12 x 85 = 1020 at width 1024."""
    mlp_ratio: float = 4.0
    """MLP hidden width / width."""
    embed_kernel: int = 1
    """Side of the conv that embeds the latent grid into tokens (odd; 1 = each token from its own cell, as
    EvoTok). 3 gives every token its neighbours' codes before the first attention layer: on a trained tiny
    tokenizer's frozen codes, a decoder trained alone reached a one-cell shape probe of 0.93 in 750 steps
    with 3, against 0.46 after 1000 with 1; inside the 540 joint stage-1 steps it did not help (docs/results.md)."""

    def validate(self) -> None:
        if self.embed_kernel < 1 or self.embed_kernel % 2 == 0:
            raise ConfigError("embed_kernel", f"must be odd and >= 1, got {self.embed_kernel}")


@dataclass
class TokenizerConfig:
    """The whole tokenizer model (a pure nn.Module is built from this alone)."""

    encoder: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    """Shared encoder (fine-tuned)."""
    teacher: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    """Frozen semantic teacher whose feature_layer hidden states the semantic decoder regresses."""
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    """Residual quantiser."""
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    """Pixel decoder (reads the first depth_pix stages)."""
    semantic_decoder: SemanticDecoderConfig = field(default_factory=SemanticDecoderConfig)
    """Semantic decoder (reads all depth_sem stages)."""

    def validate(self) -> None:
        e, t = self.encoder, self.teacher
        if (e.image_size // e.patch_size) != (t.image_size // t.patch_size):
            raise ConfigError("teacher", "teacher and encoder token grids differ")
        grid = e.image_size // e.patch_size
        if grid * 2 ** (len(self.pixel_decoder.channel_mult) - 1) != e.image_size:
            raise ConfigError(
                "pixel_decoder.channel_mult",
                f"{len(self.pixel_decoder.channel_mult) - 1} upsamplings from a {grid}x{grid} grid do not give "
                f"{e.image_size} px",
            )


def preset(name: str) -> TokenizerConfig:
    """``tiny`` or ``base-256`` (see module docstring)."""
    if name == "tiny":
        return TokenizerConfig()
    if name == "base-256":
        siglip_l = VisionTowerConfig(image_size=256, patch_size=16, hidden_size=1024, num_layers=24, num_heads=16,
                                     intermediate_size=4096)
        return TokenizerConfig(
            encoder=siglip_l,
            teacher=VisionTowerConfig(**vars(siglip_l)),
            quantizer=QuantizerConfig(codebook_size=32768, dim=32, depth_sem=16, depth_pix=4, warmup_steps=2000),
            pixel_decoder=PixelDecoderConfig(z_channels=256, channels=128, channel_mult=(1, 1, 2, 2, 4),
                                             num_res_blocks=2),
            semantic_decoder=SemanticDecoderConfig(width=1024, depth=3, num_heads=12, head_dim=85),
        )
    raise ConfigError("preset", f"unknown tokenizer preset {name!r} (tiny, base-256)")

