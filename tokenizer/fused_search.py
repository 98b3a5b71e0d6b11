"""The quantiser's nearest-code search as one Triton kernel: distances and a running argmin over codebook blocks.

For every row x_n of x (N, D) it returns argmin_k ||C_k||^2 - 2 x_n . C_k (the row's own ||x_n||^2 does not
change the argmin, so it is never added). Each program owns ``BLOCK_N`` rows; it walks the codebook in blocks of
``BLOCK_K`` codes, computes that (BLOCK_N, BLOCK_K) tile of distances in registers with one ``tl.dot``, and keeps
the smallest distance and its index per row. The N x K distance matrix is never written: memory traffic is the
inputs once per program (x) and the codebook once per program, against the chunked search's N x K float32
chunks (~69 GB a step at the reference shape, docs/performance.md).

Ties go to the lowest index (``tl.argmin`` inside a block, a strict ``<`` across blocks), as in
:func:`tokenizer.quantizer.nearest_codes`. The float32 products are computed in IEEE precision by default
(``precision="tf32"`` trades exactness for tensor-core speed); the summation order differs from the chunked
search's BLAS, so two codes whose distances agree to the last bits may be swapped (near ties; the tests count
them). The kernel runs on CUDA; with ``TRITON_INTERPRET=1`` Triton's interpreter runs it on the CPU (the tests).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor


def available(device: torch.device) -> bool:
    """Whether the fused search can run on ``device``: Triton is installed, and the device is CUDA (or the
    interpreter is on, ``TRITON_INTERPRET=1``, for CPU tensors)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nearest(x_ptr, c_ptr, cn_ptr, out_ptr, N, K, D: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        row_ok = rows < N
        d = tl.arange(0, D)
        x = tl.load(x_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)  # (BN, D)
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best_k = tl.zeros((BLOCK_N,), tl.int64)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            k_ok = ks < K
            c = tl.load(c_ptr + ks[:, None] * D + d[None, :], mask=k_ok[:, None], other=0.0)  # (BK, D)
            cn = tl.load(cn_ptr + ks, mask=k_ok, other=float("inf"))  # (BK,) ||C_k||^2
            dist = cn[None, :] - 2.0 * tl.dot(x, tl.trans(c), input_precision=PRECISION)  # (BN, BK)
            block_min = tl.min(dist, axis=1)  # (BN,)
            block_arg = tl.argmin(dist, axis=1)  # (BN,) first index of the block minimum
            better = block_min < best  # strict: an earlier block keeps a tie
            best = tl.where(better, block_min, best)
            best_k = tl.where(better, k0 + block_arg.to(tl.int64), best_k)
        tl.store(out_ptr + rows, best_k, mask=row_ok)

    return nearest


def fused_nearest_codes(x: Tensor, codebook: Tensor, *, precision: str = "ieee", block_n: int = 64,
                        block_k: int = 64) -> Tensor:
    """argmin_k ||x_n - C_k||^2 for x (N, D) against codebook (K, D), both float32 on one device -> (N,) long.
    D must be a power of two >= 16 (``tl.dot``); the reference's 32 is."""
    import triton

    n, dim = x.shape
    k = codebook.shape[0]
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"fused search needs a power-of-two code dimension >= 16, got {dim}")
    x = x.float().contiguous()
    codebook = codebook.float().contiguous()
    norms = (codebook * codebook).sum(1)  # (K,)
    out = torch.empty(n, dtype=torch.long, device=x.device)
    if n:
        _kernel()[(triton.cdiv(n, block_n),)](x, codebook, norms, out, n, k, D=dim, BLOCK_N=block_n,
                                             BLOCK_K=block_k, PRECISION=precision)
    return out
