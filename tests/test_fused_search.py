"""The fused nearest-code kernel (tokenizer.fused_search) against the chunked search, under Triton's CPU
interpreter (TRITON_INTERPRET=1, set before Triton loads) in CI, and at the reference shape on a GPU."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # noqa: E402 - Triton reads it when it loads

import pytest
import torch

from tokenizer.config import QuantizerConfig
from tokenizer.quantizer import ResidualQuantizer, nearest_codes

triton = pytest.importorskip("triton")
from tokenizer.fused_search import fused_nearest_codes  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"


def near_ties(x, codebook, a, b) -> torch.Tensor:
    """Rows where the two searches disagree, with the two codes' distances (float64) relatively apart."""
    diff = (a != b).nonzero().flatten()
    xd, cd = x[diff].double(), codebook.double()
    da = ((xd - cd[a[diff]]) ** 2).sum(1)
    db = ((xd - cd[b[diff]]) ** 2).sum(1)
    return (da - db).abs() / db.clamp(min=1e-12)


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="needs CUDA or the interpreter")
@pytest.mark.parametrize("n, k, scale", [(300, 1000, 1.0), (257, 64, 0.05), (1, 130, 3.0)])
def test_fused_equals_chunked_search_but_near_ties(n, k, scale):
    gen = torch.Generator().manual_seed(n + k)
    x = (torch.randn(n, 32, generator=gen) * scale).to(DEVICE)
    codebook = (torch.randn(k, 32, generator=gen) * scale).to(DEVICE)
    a = fused_nearest_codes(x, codebook)
    b = nearest_codes(x, codebook, 128)
    gap = near_ties(x, codebook, a, b)
    assert (a != b).float().mean() <= 0.01 and (gap <= 1e-5).all(), (int((a != b).sum()), gap)


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="needs CUDA or the interpreter")
def test_exact_ties_go_to_the_lowest_index_and_blocks_are_masked():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(40, 32, generator=gen)
    codebook = torch.cat([base, base, base[:5]]).to(DEVICE)  # every code three or two times; K not a multiple of 64
    x = torch.randn(100, 32, generator=gen).to(DEVICE)
    a = fused_nearest_codes(x, codebook)
    assert torch.equal(a, nearest_codes(x, codebook, 16)) and int(a.max()) < 40
    assert fused_nearest_codes(x[:0], codebook).shape == (0,)
    with pytest.raises(ValueError, match="power-of-two code dimension"):
        fused_nearest_codes(torch.zeros(3, 24, device=DEVICE), torch.zeros(5, 24, device=DEVICE))


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter runs CPU tensors")
def test_quantizer_search_fused_gives_the_chunked_codes_and_ema_state():
    cfg = dict(codebook_size=96, dim=32, depth_sem=3, depth_pix=2, warmup_steps=0)
    torch.manual_seed(0)
    chunked = ResidualQuantizer(QuantizerConfig(**cfg, search="chunked")).train()
    fused = ResidualQuantizer(QuantizerConfig(**cfg, search="fused")).train()
    fused.load_state_dict(chunked.state_dict())
    z = torch.randn(4, 6, 6, 32)
    out_c, out_f = chunked(z), fused(z)  # training mode: EMA updates and restarts from the same codes
    assert torch.equal(out_c.codes, out_f.codes)
    for (name, a), (_, b) in zip(chunked.state_dict().items(), fused.state_dict().items()):
        assert torch.allclose(a.float(), b.float()), name
    assert not ResidualQuantizer(QuantizerConfig(**cfg))._fused(torch.device("cpu"))  # auto: chunked on CPU


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reference_shape_on_the_gpu():
    """N 8192, K 32768, D 32 (one depth of the reference step): near ties only."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, 32, device="cuda", generator=gen)
    codebook = torch.randn(32768, 32, device="cuda", generator=gen)
    a, b = fused_nearest_codes(x, codebook), nearest_codes(x, codebook, 1024)
    assert (a != b).float().mean() <= 1e-3 and (near_ties(x, codebook, a, b) <= 1e-5).all()


@pytest.mark.slow
def test_gpu_suite_runs_end_to_end_at_toy_shapes_on_the_cpu(tmp_path, monkeypatch):
    """benchmarks/gpu_suite.py --device cpu --small: every part runs (the fused kernel under the interpreter)."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["gpu_suite"])
    import gpu_suite

    r = gpu_suite.main(["--device", "cpu", "--small", "--repeats", "1", "--out", str(tmp_path / "s.json"),
                        "--md", str(tmp_path / "s.md")])
    assert r["quantiser"]["fused"]["codes_equal_full"] == 1.0 and r["quantiser"]["chunked"]["codes_equal_full"] == 1.0
    assert r["stage1"]["images_per_s"] > 0 and r["sampling"]["images_per_s"] > 0
    assert r["stage2"]["packed"]["padding"] < r["stage2"]["unpacked"]["padding"]
    assert "| (c) stage 2, tiny, packed |" in (tmp_path / "s.md").read_text()
