"""EvoTok decoders: the CNN pixel decoder (reads f_pix) and the ViT semantic decoder (reads f_sem).

Both take a quantised latent map (B, h, w, D), channels last, as the residual quantiser returns it.

``PixelDecoder`` is the VQGAN / LlamaGen decoder: 1x1 post-quant conv, conv_in, mid block
(res, attn, res), one level per ``channel_mult`` entry from the lowest resolution up (``num_res_blocks + 1``
res blocks each, self-attention after each at the lowest level, nearest x2 upsample + conv between levels),
GroupNorm, Swish, 3x3 conv to RGB. Output range: **unbounded, no tanh**; it is trained against targets in
[-1, 1] (MSE/LPIPS/GAN, as the reference) and should be clamped to [-1, 1] for display and metrics.
Submodule names follow the reference decoder so official weights map one to one.

``SemanticDecoder`` is EvoTok's BEiT-v2-style ViT: 1x1 conv "patch embed" (D -> width), learned CLS + absolute
position embeddings, ``depth`` pre-LN blocks (qkv bias, attention width num_heads x head_dim, which may differ
from width as in EvoTok's 12 x 85 = 1020), LayerNorm on the patch tokens, then the task head
Linear -> Tanh -> Linear to the teacher's width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.config import PixelDecoderConfig, SemanticDecoderConfig

# ----------------------------------------------------------------------------- pixel decoder


def _num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= max_groups dividing ``channels`` (32 for the usual widths)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(channels), channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GroupNorm -> Swish -> conv3x3, twice, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, out, H, W)
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions (1x1-conv q, k, v, out)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        a = a.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(a)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class PixelDecoder(nn.Module):
    """Latent map (B, h, w, D) -> image (B, 3, h * 2^L, w * 2^L), L = len(channel_mult) - 1; unbounded output
    meant to approximate [-1, 1] (see module docstring).

    Args:
        cfg: decoder config.
        latent_dim: D, the quantiser's code dimension.
    """

    def __init__(self, cfg: PixelDecoderConfig, latent_dim: int):
        super().__init__()
        mult, n_res = tuple(cfg.channel_mult), cfg.num_res_blocks + 1
        self.num_levels = len(mult)
        self.post_quant_conv = nn.Conv2d(latent_dim, cfg.z_channels, 1)
        ch = cfg.channels * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        attn = cfg.attn_lowest
        # Identity keeps the reference's mid.0 / mid.1 / mid.2 indices when attention is off.
        self.mid = nn.ModuleList([ResBlock(ch, ch, cfg.dropout), AttnBlock(ch) if attn else nn.Identity(),
                                  ResBlock(ch, ch, cfg.dropout)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(self.num_levels)):  # lowest resolution first
            block = nn.Module()
            out_ch = cfg.channels * mult[level]
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(n_res):
                block.res.append(ResBlock(ch, out_ch, cfg.dropout))
                ch = out_ch
                if attn and level == self.num_levels - 1:
                    block.attn.append(AttnBlock(ch))
            if level != 0:
                block.upsample = Upsample(ch)
            self.conv_blocks.append(block)
        self.norm_out = _group_norm(ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv (for VQGAN's adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, h, w, D) -> image (B, 3, H, W)."""
        h = self.post_quant_conv(z_q.permute(0, 3, 1, 2))  # (B, z_channels, h, w)
        h = self.conv_in(h)  # (B, C_low, h, w)
        for m in self.mid:
            h = m(h)  # (B, C_low, h, w)
        for i, block in enumerate(self.conv_blocks):
            for j, res in enumerate(block.res):
                h = res(h)  # (B, C_level, H_l, W_l)
                if len(block.attn):
                    h = block.attn[j](h)
            if i != self.num_levels - 1:
                h = block.upsample(h)  # (B, C_level, 2 H_l, 2 W_l)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


# ----------------------------------------------------------------------------- semantic decoder


class Attention(nn.Module):
    """Multi-head self-attention whose inner width (heads x head_dim) may differ from the model width."""

    def __init__(self, width: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        # One biased qkv projection. (BEiT keeps q and v biases only; a k bias adds the same q.b_k to every
        # logit of a query, so softmax ignores it and converted weights simply set it to zero.)
        self.qkv = nn.Linear(width, 3 * inner, bias=True)
        self.proj = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))  # (B, N, width)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # (B, N, width)


class Block(nn.Module):
    """Pre-LN transformer block (no layer scale, no drop path)."""

    def __init__(self, width: int, num_heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, 1 + N, width)
        return x + self.mlp(self.norm2(x))  # (B, 1 + N, width)


class SemanticDecoder(nn.Module):
    """Latent map (B, h, w, D) -> teacher-like features (B, h*w, out_dim).

    Args:
        cfg: decoder config.
        latent_dim: D, the quantiser's code dimension.
        out_dim: teacher hidden size (the regression target width).
        grid_size: h = w, the token grid side (sizes the absolute position embedding).
    """

    def __init__(self, cfg: SemanticDecoderConfig, latent_dim: int, out_dim: int, grid_size: int):
        super().__init__()
        W = cfg.width
        head_dim = cfg.head_dim or W // cfg.num_heads
        self.grid_size = grid_size
        k = cfg.embed_kernel
        self.patch_embed = nn.Conv2d(latent_dim, W, k, padding=k // 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, W))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size * grid_size + 1, W))
        self.blocks = nn.ModuleList(Block(W, cfg.num_heads, head_dim, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(W, eps=1e-6)
        self.head = nn.Sequential(nn.Linear(W, W), nn.Tanh(), nn.Linear(W, out_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        # BEiT-style: trunc-normal(0.02) linears and embeddings, unit LayerNorms, and each block's output
        # projections scaled down by sqrt(2 * layer index) so the residual stream starts small.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, h, w, D) -> (B, h*w, out_dim)."""
        B, h, w, _ = z_q.shape
        if h * w + 1 != self.pos_embed.shape[1]:
            raise ValueError(f"semantic decoder built for a {self.grid_size}x{self.grid_size} grid, got {h}x{w}")
        x = self.patch_embed(z_q.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)  # (B, N, W)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + N, W)
        for blk in self.blocks:
            x = blk(x)  # (B, 1 + N, W)
        x = self.norm(x[:, 1:])  # (B, N, W)
        return self.head(x)  # (B, N, out_dim)
