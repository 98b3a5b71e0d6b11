"""The GPU path at real size, measured in one run (issue 19): quantiser search, stage-1 step, stage-2 step, sampling.

    python benchmarks/gpu_suite.py                       # on a CUDA device, real shapes (under 8 minutes on an H100/H200)
    python benchmarks/gpu_suite.py --device cpu --small  # the same code end to end at toy shapes (CI machines)

Random-init weights at the real shapes, nothing downloaded:

- (a) one nearest-code search per depth at the reference shape (N 8192 rows, K 32768 codes, D 32, 16 depths):
  the fused Triton kernel (tokenizer.fused_search) vs the chunked search vs one full N x K matrix; ms a step,
  peak memory, and the fraction of codes equal to the full matrix's. The FP32 GEMM floor is 2·N·K·D·L FLOPs at
  the device's FP32 peak.
- (b) a stage-1 step of the base-256 tokenizer (716M parameters with the teacher), batch 32, bf16 autocast:
  images/s, MFU (FlopCounterMode forward x 3), peak memory.
- (c) a stage-2 step with a Qwen2.5-1.5B-shaped LLM (config only) on precomputed codes, unpacked and packed
  (benchmarks/packing.py's samples): tokens/s, MFU (6 x parameters per real token), peak memory.
- (d) KV-cached image sampling with that model (benchmarks/generate.py's 1.5B shape): images/s.

Writes one JSON (``--out``) and a markdown table (``--md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

PEAK = {"fp32": {"H100": 67e12, "H200": 67e12}, "bf16": {"H100": 989e12, "H200": 989e12}}  # dense data-sheet peaks


def device_peak(device: str, kind: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK[kind].items() if k in name), None)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (compilation, autotuning, allocator)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- (a) quantiser search


def quantiser(device: str, small: bool, repeats: int) -> dict:
    from tokenizer import fused_search
    from tokenizer.quantizer import nearest_codes, rows_per_chunk

    n, k, d, depths = (512, 2048, 32, 4) if small else (8192, 32768, 32, 16)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, generator=gen)
    books = [torch.randn(k, d, device=device, generator=gen) for _ in range(depths)]

    def full(cb):
        return torch.addmm((x * x).sum(1, keepdim=True) + (cb * cb).sum(1), x, cb.T, alpha=-2).argmin(1)

    impls = {"full_matrix": full, "chunked": lambda cb: nearest_codes(x, cb, rows_per_chunk(k, 64))}
    if fused_search.available(torch.device(device)):
        impls["fused"] = lambda cb: fused_search.fused_nearest_codes(x, cb)
    ref = [full(cb) for cb in books]
    out = {"shape": {"N": n, "K": k, "D": d, "depths": depths}}
    flops = 2.0 * n * k * d * depths
    fp32 = device_peak(device, "fp32")
    out["fp32_gemm_floor_ms"] = flops / fp32 * 1e3 if fp32 else None
    for name, fn in impls.items():
        reset_peak(device)
        ms = timed(lambda fn=fn: [fn(cb) for cb in books], device, repeats) * 1e3
        agree = statistics.mean(float((fn(cb) == r).float().mean()) for cb, r in zip(books, ref))
        out[name] = {"ms": ms, "peak_gb": peak_gb(device), "codes_equal_full": agree}
    if "fused" in out:
        out["fused_vs_chunked"] = out["chunked"]["ms"] / out["fused"]["ms"]
        if out["fp32_gemm_floor_ms"]:
            out["fused_vs_floor"] = out["fused"]["ms"] / out["fp32_gemm_floor_ms"]
    return out


# ----------------------------------------------------------------------------- (b) stage-1 step


def stage1(device: str, small: bool, repeats: int) -> dict:
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from tokenizer.config import preset
    from tokenizer.model import EvoTokenizer

    cfg = preset("tiny" if small else "base-256")
    cfg.encoder.pretrained = cfg.teacher.pretrained = ""  # random init at the preset's shape
    batch = 4 if small else 32
    torch.manual_seed(0)
    model = EvoTokenizer(cfg, with_teacher=True).to(device).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, fused=device == "cuda")
    res = cfg.encoder.image_size
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with amp:
            out = model(x)
            target = model.teacher_features(x)
            loss = F.mse_loss(out.recon.float(), x) + (1 - F.cosine_similarity(out.sem_pred.float(),
                                                                                target.float(), dim=-1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x[:1])
        model.teacher_features(x[:1])
    model.train()
    flops_per_image = 3.0 * fc.get_total_flops()
    reset_peak(device)
    s = timed(step, device, repeats)
    bf16 = device_peak(device, "bf16")
    return {"preset": "tiny" if small else "base-256", "batch": batch, "images_per_s": batch / s, "step_s": s,
            "mfu": flops_per_image * batch / s / bf16 if bf16 else None, "peak_gb": peak_gb(device),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


# ----------------------------------------------------------------------------- (c) stage-2 step


def stage2(device: str, small: bool, repeats: int) -> dict:
    from generate import MODELS
    from packing import inputs, samples
    from train_step import build

    from llm.batch import collate_sequences, pack_sequences
    from llm.config import UnifiedConfig
    from llm.model import build_unified

    evo, text, tiny = build(device)
    if small:
        model = tiny
    else:
        llm, depth, _ = MODELS["1.5b"]
        torch.manual_seed(0)
        model = build_unified(UnifiedConfig(llm=llm, depth=depth, freeze_llm=False, image_pos_embed=True), text, [],
                              evo).to(device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    pad = model.dims.token_ids["pad"]
    raw = samples(text, model, 8 if small else 32, 1)[0]
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    bf16 = device_peak(device, "bf16")
    out = {"llm": "tiny" if small else "qwen2.5-1.5b shape", "params_m": params / 1e6}
    for name, collate in (("unpacked", lambda s: collate_sequences(s, pad)),
                          ("packed", lambda s: pack_sequences(s, pad, 2 * max(len(x["input_ids"]) for x in s)))):
        b = collate(raw)
        real = float(b["attention_mask"].sum())
        args = inputs(evo, b, device)

        def step(args=args):
            with amp:
                loss = model(**args)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        reset_peak(device)
        s = timed(step, device, repeats)
        out[name] = {"rows": int(b["input_ids"].shape[0]), "padding": 1 - float(b["attention_mask"].float().mean()),
                     "tokens_per_s": real / s, "mfu": 6 * params * real / s / bf16 if bf16 else None,
                     "peak_gb": peak_gb(device)}
    out["packed_vs_unpacked"] = out["packed"]["tokens_per_s"] / out["unpacked"]["tokens_per_s"]
    return out


# ----------------------------------------------------------------------------- (d) sampling


def sampling(device: str, small: bool, repeats: int) -> dict:
    from generate import build

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = build("tiny" if small else "1.5b", 16 if small else 256, device, dtype)
    prompts = ["a photo of a red circle"] * (2 if small else 16)
    s = timed(lambda: pipe.generate_codes(prompts, seed=0, batch=len(prompts), cache=True), device, repeats)
    return {"model": "tiny" if small else "1.5b shape", "positions": 16 if small else 256, "batch": len(prompts),
            "images_per_s": len(prompts) / s}


def table(r: dict) -> str:
    q, s1, s2, g = r["quantiser"], r["stage1"], r["stage2"], r["sampling"]
    fmt = lambda v, f="{:.2f}": "n/a" if v is None else f.format(v)  # noqa: E731
    shape = "N {N}, K {K}, D {D}, {depths} depths".format(**q["shape"])
    rows = [f"| (a) quantiser, {shape} | {name} | {fmt(v['ms'], '{:.1f}')} ms | peak {fmt(v['peak_gb'])} GB | "
            f"codes = full: {v['codes_equal_full']:.5f} |" for name, v in q.items() if isinstance(v, dict) and "ms" in v]
    rows.append(f"| (a) | fused vs chunked | {fmt(q.get('fused_vs_chunked'))}x | FP32 floor {fmt(q['fp32_gemm_floor_ms'])} ms"
                f" | fused / floor {fmt(q.get('fused_vs_floor'))} |")
    rows.append(f"| (b) stage 1, {s1['preset']}, batch {s1['batch']} | {s1['images_per_s']:.1f} img/s | MFU "
                f"{fmt(s1['mfu'], '{:.1%}')} | peak {fmt(s1['peak_gb'])} GB | {s1['params_m']:.0f}M parameters |")
    for name in ("unpacked", "packed"):
        v = s2[name]
        rows.append(f"| (c) stage 2, {s2['llm']}, {name} | {v['tokens_per_s']:.0f} tokens/s | MFU {fmt(v['mfu'], '{:.1%}')} "
                    f"| peak {fmt(v['peak_gb'])} GB | padding {v['padding']:.1%} in {v['rows']} rows |")
    rows.append(f"| (d) cached sampling, {g['model']} | {g['images_per_s']:.2f} img/s | batch {g['batch']} | "
                f"{g['positions']} positions | |")
    return f"Device: {r['device']}\n\n| part | figure | | | |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--small", action="store_true", help="toy shapes (a CPU run of the same code)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/gpu_suite.json")
    ap.add_argument("--md", default="benchmarks/results/gpu_suite.md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    result = {"device": name, "small": args.small, "torch": torch.__version__,
              "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    for part, fn in (("quantiser", quantiser), ("stage1", stage1), ("stage2", stage2), ("sampling", sampling)):
        t = time.perf_counter()
        result[part] = fn(args.device, args.small, args.repeats)
        print(f"{part}: {time.perf_counter() - t:.1f} s", flush=True)
    result["seconds"] = time.perf_counter() - t0
    md = table(result)
    print(md)
    for path, text in ((args.out, json.dumps(result, indent=2) + "\n"), (args.md, md)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return result


if __name__ == "__main__":
    main()
