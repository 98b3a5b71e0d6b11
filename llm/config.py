"""Config of the unified model: a Hugging Face causal LM + projectors + depth transformer over a frozen
EvoTok tokenizer.

Presets (``model_preset`` in a stage-2 YAML): ``tiny`` (random-init Qwen2-style LLM, trains on a CPU in
minutes on the shapes world), ``small`` (the same, 2x wider and 1.5x deeper: the shapes world on one GPU,
``make demo DEVICE=cuda``), ``qwen2.5-1.5b`` and ``qwen2.5-7b`` (local pretrained directories, the
reference recipe's depth transformer: 6 layers, width 2560, 40 heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unimllm.config import ConfigError


@dataclass
class LLMConfig:
    """The causal LM. ``pretrained`` loads a local directory; otherwise a random-init model of ``arch``."""

    pretrained: str = ""
    """Local Hugging Face model directory (AutoModelForCausalLM); empty = random init from the fields below."""
    arch: Literal["qwen2", "llama"] = "qwen2"
    """Random-init architecture family (ignored with pretrained)."""
    hidden_size: int = 128
    """Random init: hidden width."""
    num_layers: int = 4
    """Random init: decoder layers."""
    num_heads: int = 4
    """Random init: attention heads."""
    num_kv_heads: int = 2
    """Random init: key/value heads (GQA)."""
    intermediate_size: int = 512
    """Random init: MLP width."""
    max_position_embeddings: int = 2048
    """Random init: longest sequence (RoPE tables)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel: auto = flash_attention_2 when installed on CUDA, else SDPA."""
    trust_remote_code: bool = False
    """Allow code shipped with a pretrained directory to run (off: only transformers' own classes)."""
    text_tokenizer: str = ""
    """Local HF tokenizer directory; empty = the pretrained directory's, or (random init) the one stage 2 trains."""


@dataclass
class DepthConfig:
    """The depth ("RQ") transformer that predicts the L_pix codes of one position."""

    layers: int = 2
    """Causal transformer blocks."""
    width: int = 128
    """Hidden width."""
    heads: int = 4
    """Attention heads."""
    mlp_ratio: float = 4.0
    """MLP width as a multiple of ``width``."""
    dropout: float = 0.0
    """Residual dropout (the release uses 0.1)."""


@dataclass
class SamplerConfig:
    """Image sampling defaults (stored with the checkpoint; the release's code defaults shown in base presets)."""

    cfg_scale: float = 3.0
    """Classifier-free guidance: l_u + s * (l_c - l_u) at every depth step (1 = no guidance)."""
    temperature: float = 1.0
    """Softmax temperature (0 = greedy)."""
    top_k: int = 900
    """Keep the k most likely codes (0 = all)."""
    top_p: float = 0.96
    """Nucleus mass kept (1 = all)."""

    def validate(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("sampler", "need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


@dataclass
class UnifiedConfig:
    """The unified understanding + generation model (a pure nn.Module is built from this + a tokenizer)."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    """The causal LM."""
    tokenizer: str = ""
    """The frozen EvoTok tokenizer: a stage-1 export directory (``runs/stage1/tiny/export/tokenizer``)."""
    depth: DepthConfig = field(default_factory=DepthConfig)
    """The depth transformer."""
    projector_hidden: int = 0
    """Hidden width of both 2-layer GELU projectors (0 = the LLM's hidden size, as the release)."""
    input_norm: bool = False
    """Standardise both projectors' inputs per channel with statistics of the training data (measured once
    when stage 2 starts, saved with the model). A random-init tokenizer's semantic features vary by ~2% of
    their mean, so the projector would first have to learn a large gain before the LLM sees the image."""
    image_pos_embed: bool = False
    """Add a learned embedding of the grid position to each generation slot's input (the release relies on
    the LLM's 1-D positions alone; a small random-init LLM learns the 2-D layout much faster with it)."""
    und_pos_embed: bool = False
    """Add a learned embedding of the grid position to each understanding slot's input. SigLIP-trained
    semantic features carry where each patch is; a semantic decoder trained without its teacher (the CPU
    demo) carries it only through its own position embedding (a linear probe still reads it, R^2 0.97, and
    the option made no measurable difference there; the ``small`` preset has it, as measured)."""
    text_weight: float = 1.0
    """Weight of the text cross-entropy."""
    image_weight: float = 1.0
    """Weight of the image-code cross-entropy (mean over positions x depths)."""
    freeze_llm: bool = True
    """Freeze the LLM (only projectors, depth transformer and the new token rows train)."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in backward (saves memory; only useful with an unfrozen LLM)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Default image sampler settings, saved with the export."""

    def validate(self) -> None:
        if self.text_weight < 0 or self.image_weight < 0 or self.text_weight + self.image_weight == 0:
            raise ConfigError("text_weight", "loss weights must be >= 0 and not both 0")


def preset(name: str) -> UnifiedConfig:
    """``tiny``, ``small``, ``qwen2.5-1.5b`` or ``qwen2.5-7b`` (see module docstring)."""
    if name == "tiny":
        return UnifiedConfig(freeze_llm=False, input_norm=True, image_pos_embed=True,
                             sampler=SamplerConfig(cfg_scale=3.0, top_k=0, top_p=1.0))
    if name == "small":
        return UnifiedConfig(llm=LLMConfig(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4,
                                           intermediate_size=1024),
                             depth=DepthConfig(layers=2, width=256, heads=8), freeze_llm=False, input_norm=True,
                             image_pos_embed=True, und_pos_embed=True,
                             sampler=SamplerConfig(cfg_scale=3.0, top_k=0, top_p=1.0))
    ref_depth = DepthConfig(layers=6, width=2560, heads=40, dropout=0.1)
    if name == "qwen2.5-1.5b":
        return UnifiedConfig(llm=LLMConfig(pretrained="models/Qwen2.5-1.5B-Instruct"), depth=ref_depth)
    if name == "qwen2.5-7b":
        return UnifiedConfig(llm=LLMConfig(pretrained="models/Qwen2.5-7B-Instruct"), depth=ref_depth)
    raise ConfigError("model_preset", f"unknown unified-model preset {name!r} (tiny, small, qwen2.5-1.5b, qwen2.5-7b)")
