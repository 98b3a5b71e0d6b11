"""The depth ("RQ") transformer: predicts the L_pix codes of one image position, one depth at a time.

Input sequence at a position (length L_pix):
    [in_h(h), in_e(e_1), in_e(e_1 + e_2), ..., in_e(e_1 + ... + e_{L-1})] + depth position embedding
where h is the LLM's last hidden state at the previous sequence position and e_d the tokenizer's
code vectors (cumulative sums, as the release). A causal pre-LN transformer runs over it; slot d's
output goes to ``heads[d]`` (LayerNorm + Linear) and predicts code k_{d+1}.

``forward`` is the teacher-forced training pass over all L slots. ``step`` runs one slot with a
key/value cache, so sampling never re-runs the depth prefix.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llm.config import DepthConfig

KVCache = list[tuple[Tensor, Tensor]]


class _Block(nn.Module):
    """Pre-LN causal self-attention + GELU MLP, biases on."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (M, S, W) -> (M, S, W) and this layer's (k, v) over all slots so far (M, heads, S_total, W/heads).
        With a cache, x holds the new slots only and attends to cached + new (causal within the new)."""
        M, S, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(M, S, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)  # (M, heads, S_total, W/heads)
        causal = S > 1
        if causal and k.shape[2] != S:
            raise ValueError("a cached step takes one new slot at a time")
        # Explicit attention over at most L_pix slots (the fused SDPA kernels returned None under CUDA bf16
        # autocast at the training shape, ~20k rows of length 3, on torch 2.11; at this length they gain nothing)
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (M, heads, S, S_total)
        if causal:
            scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        a = scores.float().softmax(-1).to(v.dtype) @ v  # (M, heads, S, W/heads)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(M, S, W)))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, (k, v)


class DepthTransformer(nn.Module):
    """Args: cfg; llm_hidden (H); code_dim (D); depth (L_pix); codebook_size (K)."""

    def __init__(self, cfg: DepthConfig, llm_hidden: int, code_dim: int, depth: int, codebook_size: int):
        super().__init__()
        W = cfg.width
        if W % cfg.heads:
            raise ValueError(f"depth.width {W} is not divisible by depth.heads {cfg.heads}")
        self.depth = depth
        self.in_h, self.in_e = nn.Linear(llm_hidden, W), nn.Linear(code_dim, W)
        self.pos = nn.Parameter(torch.randn(depth, W) * 0.02)  # (L, W)
        self.blocks = nn.ModuleList(_Block(W, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.layers))
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(W), nn.Linear(W, codebook_size)) for _ in range(depth))

    def embed(self, h: Tensor, cum_e: Tensor) -> Tensor:
        """h (M, H), cum_e (M, S-1, D) cumulative code sums -> slot inputs (M, S, W) for slots 0..S-1."""
        x = torch.cat([self.in_h(h).unsqueeze(1), self.in_e(cum_e)], 1)  # (M, S, W)
        return x + self.pos[: x.shape[1]]

    def forward(self, h: Tensor, cum_e: Tensor) -> Tensor:
        """Teacher forcing: h (M, H), cum_e (M, L-1, D) -> logits (M, L, K)."""
        x = self.embed(h, cum_e)  # (M, L, W)
        for blk in self.blocks:
            x, _ = blk(x)
        return torch.stack([head(x[:, d]) for d, head in enumerate(self.heads)], 1)  # (M, L, K)

    def step(self, x: Tensor, d: int, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        """One cached slot: x (M, 1, W) the embedded input of slot d -> logits (M, K) of code d+1, new cache."""
        new: KVCache = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if cache is None else cache[i])
            new.append(kv)
        return self.heads[d](x[:, 0]), new

    def slot_input(self, d: int, h: Tensor | None = None, cum_e: Tensor | None = None) -> Tensor:
        """Embedded input of slot d alone (M, 1, W): from h (M, H) at d = 0, else from cum_e (M, D)."""
        x = self.in_h(h) if d == 0 else self.in_e(cum_e)  # (M, W)
        return (x + self.pos[d]).unsqueeze(1)

    def prefix_logits(self, h: Tensor, cum_e: Tensor) -> Tensor:
        """Uncached: re-run slots 0..d (cum_e (M, d, D)) and return the logits of code d+1 (M, K)."""
        x = self.embed(h, cum_e)  # (M, d + 1, W)
        for blk in self.blocks:
            x, _ = blk(x)
        return self.heads[cum_e.shape[1]](x[:, -1])
