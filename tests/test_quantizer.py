"""Residual quantiser: round trip, exact chunked search, EMA/warm-up/restart against an independent
dense reference, straight-through gradients, and bit-identical buffers across 2 gloo ranks."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tokenizer.config import QuantizerConfig
from tokenizer.quantizer import ResidualQuantizer, nearest_codes, rows_per_chunk

BUFFERS = ("codebook", "embed_sum", "cluster_size", "step", "seed", "restarts_total")


def small_cfg(**kw) -> QuantizerConfig:
    base = dict(codebook_size=32, dim=8, depth_sem=4, depth_pix=2, decay=0.9, warmup_steps=0)
    return QuantizerConfig(**{**base, **kw})


def buffers(q: ResidualQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


# ----------------------------------------------------------------------------- independent reference


def full_argmin(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """The straightforward search: the whole N x K distance matrix, then argmin."""
    d = torch.addmm(x.pow(2).sum(1, keepdim=True) + cb.pow(2).sum(1)[None], x, cb.t(), alpha=-2.0)
    return d.argmin(1)


def reference_step(state: dict, z: torch.Tensor, cfg: QuantizerConfig):
    """One training step with a dense one-hot, no restarts. Returns the new cluster_size, embed_sum
    and codebook (L, ...) and the residual fed to each depth (L, N, D)."""
    K = cfg.codebook_size
    cs, es, cb = state["cluster_size"].clone(), state["embed_sum"].clone(), state["codebook"].clone()
    r = z.reshape(-1, cfg.dim).clone()
    residuals = []
    for i in range(cfg.depth_sem):
        residuals.append(r.clone())
        k = full_argmin(r, state["codebook"][i])
        one_hot = torch.zeros(K, r.shape[0])
        one_hot[k, torch.arange(r.shape[0])] = 1.0
        cs[i] = cfg.decay * cs[i] + (1 - cfg.decay) * one_hot.sum(1)
        if int(state["step"]) >= cfg.warmup_steps:
            es[i] = cfg.decay * es[i] + (1 - cfg.decay) * (one_hot @ r)
        n = cs[i].sum()
        cb[i] = es[i] / (n * (cs[i] + cfg.eps) / (n + K * cfg.eps)).clamp(min=1.0)[:, None]
        r = r - state["codebook"][i][k]
    return cs, es, cb, torch.stack(residuals)


# ----------------------------------------------------------------------------- round trip, search


def test_decode_of_encode_equals_forward_cumsum_and_residuals_shrink():
    torch.manual_seed(0)
    cfg = small_cfg(depth_sem=6, depth_pix=3)
    q = ResidualQuantizer(cfg)
    for _ in range(8):                                        # trained-ish codebooks
        q(torch.randn(4, 6, 6, cfg.dim))
    q.eval()
    z = torch.randn(3, 6, 6, cfg.dim)
    before = buffers(q)
    out = q(z)
    codes = q.encode(z)
    assert codes.shape == (3, 6, 6, cfg.depth_sem) and codes.dtype == torch.long
    assert torch.equal(codes, out.codes)
    for d in range(1, cfg.depth_sem + 1):
        assert torch.equal(q.decode(codes, d), out.q_cum[d - 1])
        assert torch.equal(q.decode(codes[..., :d], d), out.q_cum[d - 1])   # fewer levels suffice
    norms = [z.norm(dim=-1).mean()] + [(z - out.q_cum[d]).norm(dim=-1).mean() for d in range(cfg.depth_sem)]
    assert all(b <= a for a, b in zip(norms, norms[1:])), norms
    with pytest.raises(ValueError):
        q.decode(codes[..., :2], 3)
    # eval forwards and encode never touch buffers; neither does a training forward without grad
    q.train()
    with torch.no_grad():
        q(z)
    after = buffers(q)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rows_per_chunk():
    assert rows_per_chunk(32768, 256) == 2048
    assert rows_per_chunk(32768, 0.001) == 1
    assert rows_per_chunk(4096, 256) == 16384


@pytest.mark.parametrize("integer_data", [True, False], ids=["exact-ties", "random-float"])
def test_chunked_search_equals_full_matrix(integer_data):
    g = torch.Generator().manual_seed(1)
    n, k, d = 203, 256, 16                                    # K = 4 blocks of the CPU block-argmin
    if integer_data:   # exactly representable: every BLAS path gives the same distances, ties included
        x = torch.randint(-3, 4, (n, d), generator=g).float()
        cb = torch.randint(-3, 4, (k, d), generator=g).float()
        cb[40] = cb[200] = cb[7]                              # duplicates in the same / a later block:
        x[:10] = cb[7]                                        # the lowest index must win
    else:
        x, cb = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    ref = full_argmin(x, cb)
    if integer_data:
        assert (ref[:10] == 7).all()
    for rows in (1, 2, 7, 50, 64, 202, n, 10 * n):
        assert torch.equal(nearest_codes(x, cb, rows), ref), rows


# ----------------------------------------------------------------------------- EMA, warm-up, restarts


def test_ema_and_warmup_match_dense_reference():
    torch.manual_seed(2)
    cfg = small_cfg(restart_dead=False, warmup_steps=2)
    q = ResidualQuantizer(cfg)
    es0 = q.embed_sum.clone()
    for step in range(4):
        state = buffers(q)
        z = torch.randn(2, 5, 5, cfg.dim) + 0.5
        cs, es, cb, _ = reference_step(state, z, cfg)
        out = q(z)
        assert int(q.step) == step + 1 and int(out.restarts.sum()) == 0
        torch.testing.assert_close(q.cluster_size, cs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q.embed_sum, es, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.codebook, cb, rtol=1e-5, atol=1e-6)
        if step < cfg.warmup_steps:
            assert torch.equal(q.embed_sum, es0)              # warm-up: code sums untouched
        else:
            assert not torch.equal(q.embed_sum, state["embed_sum"])
        assert (q.cluster_size.sum(1) > 0).all()              # cluster sizes update from step 0


def test_restart_replaces_dead_codes_with_residuals_and_keeps_alive_ones():
    torch.manual_seed(3)
    cfg = small_cfg(dead_threshold=1.5, decay=0.8)
    q = ResidualQuantizer(cfg)
    first = q(torch.randn(2, 4, 4, cfg.dim))
    assert (first.restarts == cfg.codebook_size).all()        # cluster sizes start at 0: all dead
    state = buffers(q)
    z = torch.randn(2, 4, 4, cfg.dim)
    cs, es, cb, residuals = reference_step(state, z, cfg)
    out = q(z)
    dead = cs < cfg.dead_threshold                            # (L, K)
    assert 0 < int(dead.sum()) < dead.numel()
    assert torch.equal(out.restarts, dead.sum(1))
    assert torch.equal(q.restarts_total, first.restarts + out.restarts)
    cs[dead] = cfg.dead_threshold
    n = cs.sum(1, keepdim=True)
    norm = (n * (cs + cfg.eps) / (n + cfg.codebook_size * cfg.eps)).clamp(min=1.0)
    alive = ~dead
    torch.testing.assert_close(q.cluster_size, cs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.embed_sum[alive], es[alive], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.codebook[alive], (es / norm[..., None])[alive], rtol=1e-5, atol=1e-6)
    for i in range(cfg.depth_sem):                            # each dead code is one of this depth's residuals
        new = q.codebook[i][dead[i]]                          # (n_dead, D)
        gap = (new[:, None] - residuals[i][None]).abs().amax(-1).min(1).values  # (n_dead,)
        assert (gap < 1e-4).all(), (i, gap.max())


def test_restart_draws_are_reproducible():
    cfg = small_cfg(dead_threshold=1.5)
    runs = []
    for _ in range(2):
        torch.manual_seed(4)
        q = ResidualQuantizer(cfg)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            q(torch.randn(2, 4, 4, cfg.dim, generator=g))
        runs.append(buffers(q))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in BUFFERS)


# ----------------------------------------------------------------------------- gradients


def test_straight_through_and_commit_loss_gradients():
    torch.manual_seed(5)
    cfg = small_cfg()
    q = ResidualQuantizer(cfg)
    z = torch.randn(2, 3, 3, cfg.dim, requires_grad=True)
    out = q(z)
    torch.testing.assert_close(out.z_q_pix, out.q_cum[cfg.depth_pix - 1])
    torch.testing.assert_close(out.z_q_sem, out.q_cum[-1])
    g_pix, g_sem = torch.randn_like(z), torch.randn_like(z)
    (gz,) = torch.autograd.grad((out.z_q_pix * g_pix).sum() + (out.z_q_sem * g_sem).sum(), z)
    assert torch.equal(gz, g_pix + g_sem)                     # identity through both branches
    (gc,) = torch.autograd.grad(out.commit_loss, z)
    expected = torch.stack([2.0 / z.numel() * (z - out.q_cum[d]) for d in range(cfg.depth_sem)]).mean(0)
    torch.testing.assert_close(gc, expected.detach())
    manual = torch.stack([(z - out.q_cum[d]).pow(2).mean() for d in range(cfg.depth_sem)]).mean()
    torch.testing.assert_close(out.commit_loss, manual)


# ----------------------------------------------------------------------------- data parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)                         # different init: step 0 must sync it
        cfg = small_cfg(codebook_size=16, dead_threshold=3.0, decay=0.8, warmup_steps=2)
        q = ResidualQuantizer(cfg)
        later_restarts = 0
        for step in range(6):
            sign = 1.0 if rank == 0 else -1.0                 # different data on each rank, and sizes
            z = torch.randn(2 + rank, 4, 4, cfg.dim) + sign * 3.0
            out = q(z)
            later_restarts += int(out.restarts.sum()) if step else 0
        torch.save({"state": q.state_dict(), "later_restarts": later_restarts}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_buffers_are_bit_identical(tmp_path):
    mp.spawn(_dp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for k in BUFFERS:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert int(r0["state"]["step"]) == 6
    assert r0["later_restarts"] > 0 and (r0["state"]["restarts_total"] > 0).all()
    first = copy.deepcopy(r0["state"]["codebook"][0]).mean(1)  # restarts drew from both ranks' residuals
    assert (first > 1.0).any() and (first < -1.0).any()


def test_dtype_casts_keep_the_ema_state_float32():
    """A bf16 engine casts the whole module; the codebooks and EMA sums must stay exact float32."""
    q = ResidualQuantizer(QuantizerConfig(codebook_size=16, dim=4, depth_sem=3, depth_pix=2))
    before = {n: b.clone() for n, b in q.named_buffers()}
    q.bfloat16()
    for n, b in q.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    out = q.train()(torch.randn(2, 3, 3, 4, dtype=torch.bfloat16, requires_grad=True))
    assert out.z_q_pix.dtype == torch.bfloat16 and q.codebook.dtype == torch.float32
