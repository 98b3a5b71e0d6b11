"""Residual vector quantiser with EMA codebooks and dead-code restart (EvoTok's shared RVQ cascade).

Stage i picks k_i = argmin_k ||r_{i-1} - C_i[k]||^2 on the running residual of the *detached* latent
(r_0 = sg(z), r_i = r_{i-1} - C_i[k_i]), each stage with its own codebook C_i (K x D). The pixel branch
reads q_{<=L_pix} and the semantic branch q_{<=L_sem}, where q_{<=d} = sum_{i<=d} C_i[k_i], both
through a straight-through estimator. Codebooks have no gradient: they are EMA k-means with a warm-up
and dead-code restart, as the official release (``shared_rq_quantizer.py``), with these differences:

- the nearest-code search runs in row chunks (``cfg.search_memory_mb``), never building the N x K
  distance matrix, and EMA sums use ``index_add_``/``bincount`` instead of a dense K x N one-hot;
- with ``warmup_steps = 0`` code sums are EMA-updated from the first step (the release never updates
  them then, see the reference notes);
- a restarted code's EMA sum is set so that its code vector equals the drawn residual (to rounding);
- restart draws come from a seeded ``torch.Generator`` (seed buffer + step), so runs are reproducible.

Under data parallelism (torch.distributed initialised) counts and sums are all-reduced before the
EMA update and restart vectors are drawn on rank 0 from the all-gathered residuals and broadcast, so
every rank holds bit-identical buffers. On the first training step rank 0's buffers are broadcast.
Buffers are float32 and must stay so (do not cast this module to bf16). Activation-checkpointing
the quantiser would update the codebooks twice per step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tokenizer import fused_search
from tokenizer.config import QuantizerConfig
from tokenizer.fused_search import fused_nearest_codes

# ----------------------------------------------------------------------------- distributed helpers
# All are no-ops in a single process (torch.distributed missing, not initialised, or a world of one).


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_rank0() -> bool:
    return _world() == 1 or dist.get_rank() == 0


def _all_reduce_sum(t: Tensor) -> Tensor:
    if _world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast0(t: Tensor) -> Tensor:
    if _world() > 1:
        dist.broadcast(t, src=0)
    return t


def _all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's (n_r, D) rows in rank order (ranks may hold different n_r)."""
    world = _world()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_ = [int(s) for s in sizes]
    pad = x.new_zeros(max(sizes_), x.shape[1])                    # (n_max, D)
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_)])     # (sum n_r, D)


# ----------------------------------------------------------------------------- nearest-code search


def rows_per_chunk(codebook_size: int, memory_mb: float, bytes_per_value: int = 4) -> int:
    """Rows of the (rows x K) float32 distance chunk that fit ``memory_mb`` MiB (at least 1)."""
    return max(1, int(memory_mb * 2**20) // (codebook_size * bytes_per_value))


def _first_argmin(d: Tensor, block: int = 64) -> Tensor:
    """``torch.argmin(d, dim=1)`` for d (r, K), ties to the lowest index. On CPU through block minima:
    ``amin`` is vectorised there and ``argmin`` is not (4x at K = 32768). The first block holding the
    row minimum holds its first occurrence, so the result is identical."""
    r, k = d.shape
    if d.device.type != "cpu" or k % block or k < 2 * block:
        return d.argmin(dim=1)
    blocks = d.view(r, k // block, block)                         # (r, K/B, B)
    first = blocks.amin(dim=2).argmin(dim=1)                      # (r,) first block with the row minimum
    within = blocks[torch.arange(r, device=d.device), first].argmin(dim=1)  # (r,)
    return first * block + within


@torch.no_grad()
def nearest_codes(x: Tensor, codebook: Tensor, chunk_rows: int) -> Tensor:
    """argmin_k ||x_n - C_k||^2 for every row of x (N, D) against codebook (K, D) -> (N,) long.

    Distances are ||x||^2 + ||C||^2 - 2 x.C^T, evaluated as one addmm per chunk of ``chunk_rows`` rows
    into a single reused (chunk_rows, K) buffer: the same float32 operations, in the same order, as
    the full-matrix ``addmm(||x||^2 + ||C||^2, x, C^T, alpha=-2)``, so codes equal its argmin whenever
    the BLAS rounds a chunk's rows as it rounds them inside the full product (it does for chunks of a
    few dozen rows or more; a short tail chunk may differ in the last bit on MKL, so an exact-to-1-ulp
    tie could then resolve differently -- just as it can between two BLAS builds). Ties: the lowest
    index wins (``torch.argmin``).
    """
    n, k = x.shape[0], codebook.shape[0]
    x_sq = x.pow(2).sum(dim=1, keepdim=True)                      # (N, 1)
    c_sq = codebook.pow(2).sum(dim=1)                             # (K,)
    c_t = codebook.t()                                            # (D, K)
    codes = torch.empty(n, dtype=torch.long, device=x.device)     # (N,)
    rows = max(1, min(n, chunk_rows))
    buf = x.new_empty(rows, k)                                    # (rows, K), the only N x K-sized memory
    for s in range(0, n, rows):
        e = min(n, s + rows)
        d = buf[: e - s]                                          # (r, K)
        torch.add(x_sq[s:e], c_sq, out=d)
        d.addmm_(x[s:e], c_t, alpha=-2.0)
        codes[s:e] = _first_argmin(d)
    return codes


# ----------------------------------------------------------------------------- module


class QuantizerOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds the tensors of tuples (its backward hooks) but
    not of dataclasses. What one forward returns. ``...`` = the latent's leading dims, usually (B, H, W)."""

    codes: Tensor
    """(..., L_sem) long code indices, stage by stage."""
    z_q_pix: Tensor
    """(..., D) z + sg(q_{<=L_pix} - z): pixel-decoder input, identity gradient to z."""
    z_q_sem: Tensor
    """(..., D) z + sg(q_{<=L_sem} - z): semantic-decoder input, identity gradient to z."""
    commit_loss: Tensor
    """() mean over d = 1..L_sem of mean((z - sg(q_{<=d}))^2)."""
    q_cum: Tensor
    """(L_sem, ..., D) detached float32 cumulative sums q_{<=1} ... q_{<=L_sem}."""
    usage: Tensor
    """(L_sem,) fraction of the K codes used in this batch (all ranks' batches while training)."""
    perplexity: Tensor
    """(L_sem,) exp(entropy) of the batch code histogram per stage."""
    restarts: Tensor
    """(L_sem,) long, dead codes restarted by this call (zeros outside training)."""


class ResidualQuantizer(nn.Module):
    """L_sem-stage residual VQ on channel-last latents z (..., D), e.g. (B, H, W, D).

    Buffers (no parameters): ``codebook`` (L, K, D), EMA ``cluster_size`` (L, K) and ``embed_sum``
    (L, K, D), ``step`` (training forwards so far, for the warm-up), ``seed`` (restart draws) and
    ``restarts_total`` (L,). The codebook is always embed_sum / clamp(n (cluster_size + eps) /
    (n + K eps), min=1) with n = sum(cluster_size), as the release. Buffers change only in a
    training-mode forward with grad enabled; ``encode``/``decode`` and eval forwards never change them.
    Under torch.distributed a training forward is a collective call: every rank must make it.
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        L, K, D = cfg.depth_sem, cfg.codebook_size, cfg.dim
        init = torch.randn(L, K, D)                                # N(0, 1) as nn.Embedding in the release
        self.register_buffer("codebook", init.clone())             # (L, K, D)
        self.register_buffer("embed_sum", init)                    # (L, K, D)
        self.register_buffer("cluster_size", torch.zeros(L, K))    # (L, K)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("seed", torch.randint(0, 2**31 - 1, (), dtype=torch.long))
        self.register_buffer("restarts_total", torch.zeros(L, dtype=torch.long))

    # ------------------------------------------------------------------ public API

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply; dtype casts (``.bfloat16()``, DeepSpeed bf16/fp16 engines) never reach the
        float32 EMA state: a bf16 codebook would round every EMA update away."""
        keep = {n: b for n, b in self.named_buffers(recurse=False) if b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return self

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise z (..., D); EMA/restart updates when training with grad enabled."""
        cfg = self.cfg
        update = self.training and torch.is_grad_enabled()
        codes, q_cum, usage, perplexity, restarts = self._quantize(z, update)  # (N, L), (L, N, D)
        lead = z.shape[:-1]
        q_cum = q_cum.view(cfg.depth_sem, *lead, cfg.dim)          # (L, ..., D)
        z32 = z.float()                                            # (..., D)
        commit = (z32.unsqueeze(0) - q_cum).pow(2).mean()          # equal-size terms: mean of per-depth means
        q_pix = q_cum[cfg.depth_pix - 1].to(z.dtype)               # (..., D)
        q_sem = q_cum[-1].to(z.dtype)                              # (..., D)
        return QuantizerOutput(
            codes=codes.view(*lead, cfg.depth_sem),
            z_q_pix=z + (q_pix - z).detach(),
            z_q_sem=z + (q_sem - z).detach(),
            commit_loss=commit,
            q_cum=q_cum,
            usage=usage,
            perplexity=perplexity,
            restarts=restarts,
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Codes (..., L_sem) of z (..., D); never changes buffers."""
        codes = self._quantize(z, update=False)[0]                 # (N, L)
        return codes.view(*z.shape[:-1], self.cfg.depth_sem)

    @torch.no_grad()
    def decode(self, codes: Tensor, depth: int) -> Tensor:
        """q_{<=depth} (..., D) float32 from codes (..., >= depth): the sum of the first ``depth`` code
        vectors, added in the forward's order so it equals the forward's q_cum[depth - 1] bit for bit."""
        if not 1 <= depth <= min(self.cfg.depth_sem, codes.shape[-1]):
            raise ValueError(f"depth {depth} not in 1..min(depth_sem={self.cfg.depth_sem}, "
                             f"codes.shape[-1]={codes.shape[-1]})")
        out = self.codebook[0][codes[..., 0]]                      # (..., D)
        for i in range(1, depth):
            out = out + self.codebook[i][codes[..., i]]            # (..., D)
        return out

    # ------------------------------------------------------------------ internals

    @torch.no_grad()
    def _fused(self, device: torch.device) -> bool:
        """Whether this search runs the fused kernel (``cfg.search``; see tokenizer.fused_search)."""
        mode, dim = self.cfg.search, self.cfg.dim
        suits = dim >= 16 and dim & (dim - 1) == 0
        if mode == "fused":
            if not (suits and fused_search.available(device)):
                raise RuntimeError(f"quantizer.search: fused needs Triton on CUDA (or TRITON_INTERPRET=1) and a "
                                   f"power-of-two dim >= 16 (dim {dim}, device {device})")
            return True
        return mode == "auto" and device.type == "cuda" and suits and fused_search.available(device)

    def _quantize(self, z: Tensor, update: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Run the cascade on sg(z); returns codes (N, L), q_cum (L, N, D), usage, perplexity, restarts."""
        cfg = self.cfg
        L, K, D = cfg.depth_sem, cfg.codebook_size, cfg.dim
        if z.shape[-1] != D:
            raise ValueError(f"latent last dim {z.shape[-1]} != quantizer dim {D}")
        chunk = rows_per_chunk(K, cfg.search_memory_mb)
        restarts = torch.zeros(L, dtype=torch.long, device=z.device)
        usage = torch.zeros(L, device=z.device)
        perplexity = torch.zeros(L, device=z.device)
        if update:
            if int(self.step) == 0:
                self._broadcast_state()
            step = int(self.step)
            gen = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + step) % 2**63)
        with torch.autocast(device_type=z.device.type, enabled=False):
            r = z.detach().reshape(-1, D).float().clone()         # (N, D) running residual r_{i-1}
            codes = torch.empty(r.shape[0], L, dtype=torch.long, device=z.device)  # (N, L)
            q_cum = torch.empty(L, r.shape[0], D, device=z.device)  # (L, N, D)
            acc = torch.zeros_like(r)                              # (N, D)
            fused = self._fused(r.device)
            for i in range(L):
                k = fused_nearest_codes(r, self.codebook[i]) if fused else nearest_codes(r, self.codebook[i], chunk)
                q = self.codebook[i][k]                            # (N, D) code vectors before this step's update
                counts = torch.bincount(k, minlength=K).float()    # (K,)
                if update:
                    counts, restarts[i] = self._ema_update(i, r, k, counts, step, gen)
                usage[i] = (counts > 0).float().mean()
                p = counts / counts.sum().clamp(min=1)             # (K,)
                perplexity[i] = torch.exp(-torch.special.xlogy(p, p).sum())
                codes[:, i] = k
                r.sub_(q)
                acc.add_(q)
                q_cum[i] = acc
        if update:
            self.step += 1
            self.restarts_total += restarts
        return codes, q_cum, usage, perplexity, restarts

    def _ema_update(self, i: int, r: Tensor, k: Tensor, counts: Tensor, step: int,
                    gen: torch.Generator) -> tuple[Tensor, int]:
        """EMA k-means update of stage i from residuals r (N, D) and their codes k (N,), then dead-code
        restart; returns the all-reduced counts (K,) and the number of restarted codes."""
        cfg = self.cfg
        K, D = cfg.codebook_size, cfg.dim
        stats = torch.zeros(K, D + 1, device=r.device)             # (K, D + 1): sums | counts
        stats[:, :D].index_add_(0, k, r)
        stats[:, D] = counts
        _all_reduce_sum(stats)                                     # every rank now applies the same update
        sums, counts = stats[:, :D], stats[:, D]                   # (K, D), (K,)
        cs, es = self.cluster_size[i], self.embed_sum[i]           # (K,), (K, D) views
        cs.mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
        if step >= cfg.warmup_steps:
            es.mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)
        dead = (cs < cfg.dead_threshold) if cfg.restart_dead else torch.zeros_like(cs, dtype=torch.bool)
        n_dead = int(dead.sum())                                   # identical on every rank
        if n_dead:
            cs[dead] = cfg.dead_threshold
        n = cs.sum()
        norm = (n * (cs + cfg.eps) / (n + K * cfg.eps)).clamp(min=1.0)  # (K,)
        if n_dead:
            es[dead] = self._draw_restarts(r, n_dead, gen) * norm[dead].unsqueeze(1)
        self.codebook[i] = es / norm.unsqueeze(1)                  # (K, D)
        return counts, n_dead

    def _draw_restarts(self, r: Tensor, n_dead: int, gen: torch.Generator) -> Tensor:
        """n_dead residual rows (n_dead, D) drawn on rank 0 from all ranks' r and broadcast: without
        replacement when there are enough rows, else with replacement."""
        pool = _all_gather_rows(r)                                 # (M, D)
        out = r.new_empty(n_dead, r.shape[1])                      # (n_dead, D)
        if _is_rank0():
            m = pool.shape[0]
            if m >= n_dead:
                idx = torch.randperm(m, generator=gen)[:n_dead]
            else:
                idx = torch.randint(m, (n_dead,), generator=gen)
            out.copy_(pool[idx.to(pool.device)])
        return _broadcast0(out)

    def _broadcast_state(self) -> None:
        """Start every rank from rank 0's buffers (ranks may have been seeded differently)."""
        for t in (self.codebook, self.embed_sum, self.cluster_size, self.seed):
            _broadcast0(t)
