"""``unimllm``: the command line of trained models (installed as a console script; docs/cli.md).

    unimllm reconstruct --tokenizer runs/stage1/tiny IMAGES... --out recon/ [--depth 2]
    unimllm encode --tokenizer runs/stage1/tiny IMAGES... --out codes.npy
    unimllm chat runs/stage2/tiny --image photo.png [--question "Is there a red circle?"]
    unimllm generate runs/stage2/tiny --prompt "a photo of a red circle" --out gen/ [--n 4 --seed 0]
    unimllm export runs/stage2/tiny/checkpoints/step_00002000 --out my-model/
    unimllm info runs/stage2/tiny [--json]

Model arguments take an export or a run directory (its ``export/...``; ``export`` takes a checkpoint or a run's
latest). A path of the wrong kind, a missing file or a bad value ends the command with exit status 2 and one
line naming the path and what was expected. Arguments are used as paths and values only, never run by a shell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from unimllm.runtime import cpu_thread_defaults

cpu_thread_defaults()  # before torch loads (commands import it lazily): OpenMP reads its wait policy once

from unimllm import __version__
from unimllm.command_line import FlagParser
from unimllm.errors import ArtifactError
from unimllm.stages.artifacts import describe, tokenizer_export, training_checkpoint, unified_export
from unimllm.stages.planner import LLM_PARAMS, PEAK_BF16_TFLOPS, PlanInput, format_plan, plan, plan_json

SEED_RULE = ("image j of prompt i (0-based, --n images per prompt) is drawn with its own generator "
             "torch.Generator('cpu').manual_seed(seed + i * n + j): independent of --batch")


# ----------------------------------------------------------------------------- shared pieces


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ArtifactError(f"--device {name}: CUDA is not available")
    return torch.device(name)


def image_files(inputs: list[Path]) -> list[tuple[Path, Path]]:
    """(image file, output name) for files and folders (searched recursively for jpg/png/webp), in order; output
    names are the file's stem, or its path inside the folder, with ``.png``; two inputs may not share one."""
    from eval.recon import IMAGE_SUFFIXES

    items: list[tuple[Path, Path]] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ArtifactError(f"{p}: folder without jpg/png/webp images")
            items += [(f, f.relative_to(p).with_suffix(".png")) for f in found]
        elif p.is_file():
            items.append((p, Path(p.name).with_suffix(".png")))
        else:
            raise ArtifactError(f"{p}: no such image file or folder")
    seen: dict[Path, Path] = {}
    for src, name in items:
        if name in seen:
            raise ArtifactError(f"{src}: would be written as {name}, like {seen[name]}; pass them in separate runs")
        seen[name] = src
    return items


def _read_image(path: Path, resolution: int | None = None):
    """A PIL image (center-cropped to ``resolution`` as uint8 (R, R, 3) when given); one clear line if unreadable."""
    from data.schema import decode_image
    from unimllm.stages.reconstruction import read_image

    if not path.is_file():
        raise ArtifactError(f"{path}: no such image file")
    try:
        return read_image(path, resolution) if resolution else decode_image(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - PIL raises several kinds; all mean "not an image we can read"
        raise ArtifactError(f"{path}: not a readable image ({type(e).__name__})") from None


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" / "Writing model shards" bars on every load


def _pipeline(ckpt: Path, tokenizer: Path | None, device: str, command: str):
    """(pipeline, export directory, resolved tokenizer) of ``ckpt``; the tokenizer is hashed once."""
    from unimllm.stages.artifacts import resolve_tokenizer
    from unimllm.stages.pipeline import UnifiedPipeline

    _quiet_transformers()
    export = unified_export(ckpt, command)
    tok = resolve_tokenizer(export, tokenizer, field="--tokenizer")
    return UnifiedPipeline.from_pretrained(export, tokenizer_dir=tok, device=_device(device)), export, tok


def _tokenizer(path: Path, device: str, command: str):
    from tokenizer.model import EvoTokenizer

    ref = tokenizer_export(path, command)
    return ref, EvoTokenizer.from_pretrained(ref.path, with_teacher=False, device=_device(device))


# ----------------------------------------------------------------------------- commands


def cmd_reconstruct(args) -> int:
    from unimllm.stages.reconstruction import reconstruct_files

    items = image_files(args.images)
    _, model = _tokenizer(args.tokenizer, args.device, "reconstruct")
    q = model.cfg.quantizer
    depth = args.depth or q.depth_pix
    if not 1 <= depth <= q.depth_sem:
        raise ArtifactError(f"--depth {depth}: outside 1..{q.depth_sem} (L_sem of {args.tokenizer})")
    summary = reconstruct_files(model, items, args.out, depth, args.batch)
    for row in summary["per_image"]:
        print(f"{row['image']}: PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.4f}")
    for s in summary["skipped"]:
        print(f"skipped {s['image']}: {s['reason']}", file=sys.stderr)
    if not summary["per_image"]:
        raise ArtifactError(f"{args.images[0]}: no readable image among the inputs")
    print(f"{summary['images']} images at depth {depth}: mean PSNR {summary['psnr']:.2f} dB; wrote {args.out}")
    return 0


def cmd_encode(args) -> int:
    import numpy as np
    import torch

    from data.transforms import normalize
    from unimllm.stages.precompute_codes import codes_dtype

    if args.out.suffix != ".npy":
        raise ArtifactError(f"--out {args.out}: expected a .npy file name")
    items = image_files(args.images)
    ref, model = _tokenizer(args.tokenizer, args.device, "encode")
    res, dev = model.cfg.encoder.image_size, model.quantizer.codebook.device
    codes = []
    for i in range(0, len(items), args.batch):
        batch = [_read_image(src, res) for src, _ in items[i: i + args.batch]]  # uint8 (R, R, 3) each
        codes.append(model.encode(normalize(torch.stack(batch).to(dev))).cpu())  # (b, h, w, L_sem)
    arr = torch.cat(codes).numpy().astype(codes_dtype(model.cfg.quantizer.codebook_size))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, arr, allow_pickle=False)
    side = args.out.with_suffix(".json")
    side.write_text(json.dumps({"codes": args.out.name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                                "images": [str(src) for src, _ in items],
                                "tokenizer": {"path": str(ref.path.resolve()), "sha256": ref.sha256},
                                "preprocessing": f"center crop to {res} px (as unimllm.stages.reconstruction)"}, indent=2))
    print(f"codes {tuple(arr.shape)} {arr.dtype} of {len(items)} images -> {args.out} (+ {side.name})")
    return 0


def cmd_chat(args) -> int:
    image = _read_image(args.image)
    pipe, _, _ = _pipeline(args.ckpt, args.tokenizer, args.device, "chat")
    codes = pipe.image_codes([image])  # encoded once for every question

    def ask(question: str) -> str:
        return pipe.answer(codes, [question], max_new_tokens=args.max_new_tokens)[0]

    if args.question is not None:
        print(ask(args.question))
        return 0
    prompt = "> " if sys.stdin.isatty() else ""
    while True:
        try:
            question = input(prompt).strip()
        except EOFError:
            return 0
        if question in ("exit", "quit"):
            return 0
        if question:
            print(ask(question), flush=True)


def cmd_generate(args) -> int:
    from PIL import Image

    from unimllm.config import ConfigError

    pipe, export, tok = _pipeline(args.ckpt, args.tokenizer, args.device, "generate")
    over = {"cfg_scale": args.cfg_scale, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    sampler = dataclasses.replace(pipe.sampler, **{k: v for k, v in over.items() if v is not None})
    try:
        sampler.validate()
    except ConfigError as e:
        raise ArtifactError(f"--cfg_scale/--temperature/--top_k/--top_p: {e.message} (sampler "
                            f"{dataclasses.asdict(sampler)})") from None
    jobs = [(i, j, p) for i, p in enumerate(args.prompt) for j in range(args.n)]
    seeds = [args.seed + i * args.n + j for i, j, _ in jobs]
    images = pipe.generate_image([p for _, _, p in jobs], seeds=seeds, batch=args.batch, **dataclasses.asdict(sampler))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (i, j, prompt), seed, img in zip(jobs, seeds, images):
        name = f"{i:04d}_{j:03d}.png"
        Image.fromarray(img).save(args.out / name)
        rows.append({"file": name, "prompt": prompt, "prompt_index": i, "sample": j, "seed": seed})
    manifest = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "unimllm": __version__,
                "checkpoint": str(export.resolve()), "tokenizer": {"path": str(tok.path.resolve()), "sha256": tok.sha256},
                "sampler": dataclasses.asdict(sampler),
                "seed": args.seed, "n": args.n, "seed_rule": SEED_RULE, "images": rows}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(rows)} images of {len(args.prompt)} prompts -> {args.out} (manifest.json)")
    return 0


def cmd_export(args) -> int:
    from unimllm.stages.consolidate import export_checkpoint

    _quiet_transformers()
    ckpt = training_checkpoint(args.ckpt, "export")
    kind, out = export_checkpoint(ckpt, args.out, tokenizer_dir=args.tokenizer, text_tokenizer_dir=args.text_tokenizer,
                                  allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    print(f"exported the {kind} of {ckpt} to {out}")
    return 0


def _human(key: str, value, parent: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return str(value)
    if parent == "parameters":
        return f"{value:,} ({value / 1e6:.2f}M)"
    if parent == "entries" or key == "total_bytes":
        return next(f"{value / 2**e:.1f} {unit}" for e, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
                    if value >= 2**e or e == 0)
    return str(value)


def format_info(info, indent: int = 0, parent: str = "") -> list[str]:
    """``info`` (nested dicts/lists) as indented ``key: value`` lines."""
    pad, lines = "  " * indent, []
    items = info.items() if isinstance(info, dict) else enumerate(info)
    for k, v in items:
        k = f"[{k}]" if isinstance(info, list) else k
        if isinstance(v, (dict, list)) and v and not (isinstance(v, list) and all(isinstance(x, int) for x in v)):
            lines.append(f"{pad}{k}:")
            lines += format_info(v, indent + 1, str(k))
        else:
            lines.append(f"{pad}{k}: {_human(str(k), v, parent)}")
    return lines


def cmd_info(args) -> int:
    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else "\n".join(format_info(info)))
    return 0


# ----------------------------------------------------------------------------- parser


def cmd_plan(args) -> int:
    fields = {f: getattr(args, f) for f in PlanInput.__dataclass_fields__}
    inp = PlanInput(**fields)
    rows = plan(inp)
    print(plan_json(inp, rows) if args.json else format_plan(inp, rows))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _model_parser(sub, name: str, help_: str, dev: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = sub.add_parser(name, parents=[dev], help=help_)
    p.add_argument("ckpt", type=Path, help="unified export or a run directory holding export/unified")
    p.add_argument("--tokenizer", type=Path, default=None, help="the export's tokenizer, if it moved")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = FlagParser(prog="unimllm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"unimllm {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dev = FlagParser(add_help=False)
    dev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    tok_help = "tokenizer export, unified export (its tokenizer) or run directory"

    p = sub.add_parser("reconstruct", parents=[dev], help="images -> tokenizer -> reconstructed PNGs + PSNR")
    p.add_argument("--tokenizer", type=Path, required=True, help=tok_help)
    p.add_argument("images", type=Path, nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs and metrics.json")
    p.add_argument("--depth", type=_positive, default=None, help="decode the first d quantiser depths (default L_pix)")
    p.add_argument("--batch", type=_positive, default=16)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("encode", parents=[dev], help="images -> codes (n, h, w, L_sem) in a .npy")
    p.add_argument("--tokenizer", type=Path, required=True, help=tok_help)
    p.add_argument("images", type=Path, nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="FILE.npy (the image list goes to FILE.json)")
    p.add_argument("--batch", type=_positive, default=16)
    p.set_defaults(func=cmd_encode)

    chat = _model_parser(sub, "chat", "answer questions about one image", dev)
    gen = _model_parser(sub, "generate", "prompts -> PNG images + manifest.json", dev)
    chat.add_argument("--image", type=Path, required=True)
    chat.add_argument("--question", default=None, help="answer this and exit (else: questions from stdin until "
                                                        "EOF or 'exit')")
    chat.add_argument("--max_new_tokens", type=_positive, default=64)
    chat.set_defaults(func=cmd_chat)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    gen.add_argument("--out", type=Path, required=True, help="folder for the PNGs and manifest.json")
    gen.add_argument("--n", type=_positive, default=1, help="images per prompt")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cfg_scale", type=float, default=None, help="default: the checkpoint's sampler")
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top_k", type=int, default=None)
    gen.add_argument("--top_p", type=float, default=None)
    gen.add_argument("--batch", type=_positive, default=16)
    gen.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="training checkpoint -> standalone export (tokenizer or unified)")
    p.add_argument("ckpt", type=Path, help="checkpoints/step_XXXXXXXX directory or a run directory (its latest)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=None, help="stage 2-3: the tokenizer export (default: the "
                                                                "training config's; stage 3: its init_from's)")
    p.add_argument("--text_tokenizer", type=Path, default=None, help="stage 2-3: the text tokenizer directory")
    p.add_argument("--allow_pickle", action="store_true", help="allow DeepSpeed's unpickling loaders (ZeRO-3 "
                                                               "checkpoints): only for checkpoints you trust")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="shards, disk, CPU-hours and GPU-hours of a run at scale (docs/data.md)")
    d = PlanInput()
    p.add_argument("--images", type=_positive, default=d.images)
    p.add_argument("--resolution", type=_positive, default=d.resolution)
    p.add_argument("--shard_samples", type=_positive, default=d.shard_samples)
    p.add_argument("--image_kb", type=float, default=d.image_kb, help="stored size of one image (an assumption)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="stage-1 preset (tokenizer.config.preset)")
    p.add_argument("--stage1_steps", type=_positive, default=d.stage1_steps)
    p.add_argument("--stage1_batch", type=_positive, default=d.stage1_batch)
    p.add_argument("--llm", default=d.llm, choices=sorted(LLM_PARAMS))
    p.add_argument("--text_tokens", type=_positive, default=d.text_tokens)
    p.add_argument("--stage2_epochs", type=float, default=d.stage2_epochs)
    p.add_argument("--gpu", default=d.gpu, choices=sorted(PEAK_BF16_TFLOPS))
    p.add_argument("--mfu_tokenizer", type=float, default=d.mfu_tokenizer)
    p.add_argument("--mfu_llm", type=float, default=d.mfu_llm)
    p.add_argument("--build_results", default=d.build_results, help="benchmarks/build_shards.py's JSON")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("info", help="what a checkpoint is: config, parameters, sizes, provenance")
    p.add_argument("path", type=Path, help="tokenizer / unified export, training checkpoint or run directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as e:  # ArtifactError, ConfigError, missing files, wrong formats: one line
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"unimllm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
