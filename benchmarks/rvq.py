"""ResidualQuantizer training step (chunked search + index_add EMA) vs the full-matrix approach.

    .venv/bin/python benchmarks/rvq.py [--shapes ref,cpu] [--search-mb 256 64] [--threads N]
        [--device cpu|cuda] [--out benchmarks/results/rvq.json]

Baseline (written here, the official release's approach): per depth the whole N x K distance matrix
``addmm(||r||^2 + ||C||^2, r, C^T, alpha=-2)``, argmin, a dense K x N one-hot whose row sums and
product with the residuals give the EMA counts and sums; cumulative sums and commitment loss as in
the forward. Ours: ``ResidualQuantizer.forward`` in training mode (chunked search in
``search_memory_mb`` chunks, ``bincount``/``index_add_`` EMA, the same cumulative sums and loss).
Both run with dead-code restart off (it is not part of the search + EMA comparison) and warm-up 0,
from the same codebooks, so the first step's codes must be identical (checked).

Each implementation runs in a fresh child process. Time: median wall time of one step over all
depths (``cpu``: 7 steps after one untimed step; ``ref``: a single step, the baseline's takes about a
minute on 2 cores), and the process CPU time of the same steps (steadier than wall time on a shared
machine). Peak memory on CPU: the child's RSS high-water mark
(``ru_maxrss``) minus that of a child that only imports torch and allocates the same inputs and
state; on CUDA: ``max_memory_allocated`` above the inputs. Shapes: ``ref`` = the EvoTok recipe
(N = 32 images x 16 x 16 = 8192 vectors, K = 32768, D = 32, 16 depths); ``cpu`` = N 2048, K 4096,
D 32, 8 depths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tokenizer.config import QuantizerConfig
from tokenizer.quantizer import ResidualQuantizer

SHAPES = {  # name: (N, K, D, depths, untimed warm-up steps, timed steps)
    "ref": (8192, 32768, 32, 16, 0, 1),   # the baseline takes ~1 min per step on 2 cores: one step each
    "cpu": (2048, 4096, 32, 8, 1, 7),
}
DECAY, EPS = 0.99, 1e-5


class FullMatrixRVQ:
    """The straightforward step: full distance matrix, argmin, dense one-hot EMA (no restarts)."""

    def __init__(self, codebook: torch.Tensor):
        self.codebook = codebook.clone()                           # (L, K, D)
        self.embed_sum = codebook.clone()                          # (L, K, D)
        self.cluster_size = torch.zeros(codebook.shape[:2], device=codebook.device)  # (L, K)

    @torch.no_grad()
    def step(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, K, _ = self.codebook.shape
        r = z.clone()                                              # (N, D)
        acc = torch.zeros_like(r)
        codes, cums = [], []
        for i in range(L):
            cb = self.codebook[i]                                  # (K, D)
            dist = torch.addmm(r.pow(2).sum(1, keepdim=True) + cb.pow(2).sum(1)[None], r, cb.t(),
                               alpha=-2.0)                         # (N, K)
            k = dist.argmin(1)                                     # (N,)
            one_hot = r.new_zeros(K, r.shape[0])                   # (K, N)
            one_hot.scatter_(0, k[None], 1.0)
            self.cluster_size[i].mul_(DECAY).add_(one_hot.sum(1), alpha=1 - DECAY)
            self.embed_sum[i].mul_(DECAY).add_(one_hot @ r, alpha=1 - DECAY)
            q = cb[k]                                              # (N, D), before the update
            n = self.cluster_size[i].sum()
            norm = (n * (self.cluster_size[i] + EPS) / (n + K * EPS)).clamp(min=1.0)
            self.codebook[i] = self.embed_sum[i] / norm[:, None]
            r.sub_(q)
            acc.add_(q)
            codes.append(k)
            cums.append(acc.clone())
            del dist, one_hot                                      # a careful baseline: no N x K survives a depth
        commit = torch.stack([(z - c).pow(2).mean() for c in cums]).mean()
        return torch.stack(codes, 1), commit


def make_inputs(shape: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, k, d, depths = SHAPES[shape][:4]
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(n, d, generator=g) * 0.5).to(device)          # (N, D)
    codebook = torch.randn(depths, k, d, generator=g).to(device)   # (L, K, D)
    return z, codebook


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def child(args: argparse.Namespace) -> dict:
    """One implementation in this (fresh) process: time, peak memory, first-step codes."""
    torch.set_num_threads(args.threads)
    n, k, d, depths, warmup, repeats = SHAPES[args.shape]
    z, codebook = make_inputs(args.shape, args.device)
    if args.impl == "ours":
        cfg = QuantizerConfig(codebook_size=k, dim=d, depth_sem=depths, depth_pix=min(4, depths), decay=DECAY,
                              eps=EPS, warmup_steps=0, restart_dead=False, search_memory_mb=args.search_mb)
        model = ResidualQuantizer(cfg).to(args.device).train()
        model.codebook.copy_(codebook)
        model.embed_sum.copy_(codebook)
        del codebook

        def step():
            return model(z.view(n, 1, 1, d)).codes.view(n, depths)
    elif args.impl == "full":
        model = FullMatrixRVQ(codebook)
        del codebook

        def step():
            return model.step(z)[0]
    else:  # "inputs": the memory baseline; the same state as the implementations hold
        state = [codebook.clone(), torch.zeros(depths, k, device=args.device)]  # noqa: F841
        return {"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    times, cpu_times = [], []
    for i in range(warmup + repeats):
        sync(args.device)
        t0, c0 = time.perf_counter(), time.process_time()
        codes = step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if i == 0:   # every implementation's first step starts from the same state
            torch.save(codes.cpu(), args.codes_out)
    out = {"step_s": statistics.median(times[warmup:]), "step_times_s": times,
           "step_cpu_s": statistics.median(cpu_times[warmup:]),
           "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.device == "cuda":
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
    return out


def run_child(shape: str, impl: str, search_mb: int, args: argparse.Namespace, codes_out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--shape", shape, "--impl", impl, "--search-mb", str(search_mb),
           "--threads", str(args.threads), "--device", args.device, "--codes-out", codes_out]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_shape(shape: str, args: argparse.Namespace, tmp: str) -> dict:
    n, k, d, depths, warmup, repeats = SHAPES[shape]
    inputs = run_child(shape, "inputs", 0, args, "")
    rows = {}
    impls = [("full", "full", 0)] + [(f"ours@{mb}MiB", "ours", mb) for mb in args.search_mb]
    for name, impl, mb in impls:
        r = run_child(shape, impl, mb, args, f"{tmp}/{shape}-{name}.pt")
        mem = r["cuda_peak_mib"] if args.device == "cuda" else r["maxrss_mib"] - inputs["maxrss_mib"]
        rows[name] = {**r, "peak_mib": mem}
    ref_codes = torch.load(f"{tmp}/{shape}-full.pt", weights_only=True)
    full = rows["full"]
    for name, _, _ in impls[1:]:
        row = rows[name]
        row["codes_identical"] = bool(torch.equal(torch.load(f"{tmp}/{shape}-{name}.pt", weights_only=True), ref_codes))
        row["speedup_vs_full"] = full["step_s"] / row["step_s"]
        row["cpu_time_ratio_full_over_ours"] = full["step_cpu_s"] / row["step_cpu_s"]
        row["peak_memory_ratio_full_over_ours"] = full["peak_mib"] / row["peak_mib"]
    result = {"shape": shape, "N": n, "K": k, "D": d, "depths": depths, "warmup_steps": warmup, "timed_steps": repeats,
              "inputs_maxrss_mib": inputs["maxrss_mib"], "impls": rows}
    if args.device == "cuda":   # what one step must at least cost on an H200-class device
        flops = 2 * n * k * d * depths                             # the distance GEMMs
        bytes_min = 4 * depths * (2 * n * d + 3 * k * d + 2 * k)   # residual r/w, codebook + EMA state, sizes
        dist_bytes = 4 * 4 * n * k * depths                         # write, addmm read+write, argmin read
        result["floor"] = {"gemm_gflop": flops / 1e9, "min_bytes_mb": bytes_min / 1e6,
                           "distance_buffer_traffic_gb": dist_bytes / 1e9}
    return result


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="ref,cpu")
    ap.add_argument("--search-mb", type=int, nargs="+", default=[QuantizerConfig().search_memory_mb, 64])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/rvq.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--codes-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.search_mb = args.search_mb[0]
        print(json.dumps(child(args)))
        return None
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            results.append(bench_shape(shape, args, tmp))
    print(f"device {args.device}, {args.threads} threads; step = all depths, median; peak = working memory")
    print("| shape | impl | codes identical | step s | speed-up | CPU s | CPU-time ratio | peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res in results:
        tag = f"{res['shape']} N{res['N']} K{res['K']} D{res['D']} L{res['depths']}"
        for name, r in res["impls"].items():
            same = "reference" if name == "full" else ("yes" if r["codes_identical"] else "**NO**")
            speed = "1" if name == "full" else f"{r['speedup_vs_full']:.2f}x"
            cpu = "1" if name == "full" else f"{r['cpu_time_ratio_full_over_ours']:.2f}x"
            mem = "1" if name == "full" else f"{r['peak_memory_ratio_full_over_ours']:.1f}x lower"
            print(f"| {tag} | {name} | {same} | {r['step_s']:.3f} | {speed} | {r['step_cpu_s']:.2f} | {cpu} "
                  f"| {r['peak_mib']:.0f} | {mem} |")
        if "floor" in res:
            print(f"floor {res['shape']}: {res['floor']['gemm_gflop']:.0f} GFLOP of distance GEMMs, "
                  f">= {res['floor']['min_bytes_mb']:.0f} MB of necessary traffic, "
                  f"{res['floor']['distance_buffer_traffic_gb']:.0f} GB through the distance buffer")
    wall = time.perf_counter() - t0
    print(f"total {wall:.0f} s")
    out = {"benchmark": "rvq", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "threads": args.threads, "device": args.device,
                                           "torch": torch.__version__, "python": platform.python_version()},
           "wall_s": wall, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    ok = all(r["codes_identical"] for res in results for n, r in res["impls"].items() if n != "full")
    if not ok:
        raise SystemExit("codes differ from the full-matrix baseline")
    return out


if __name__ == "__main__":
    main()
