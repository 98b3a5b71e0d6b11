"""`make demo`: the whole chain on the built-in shapes world, timed, then one results table.

    python launch/demo.py [--runs runs/demo] [--threads N] [--device cpu|cuda] [--preset tiny|small] [--keep]

Steps (each a subprocess with an argument list, never a shell string): shapes-world shards -> stage 1
(tokenizer) -> codes precomputed with it -> stage 2 (one unified model) -> stage 3 (instruction tuning) ->
the shapes evaluation suite on the stage-3 export. ``--preset tiny`` (the default on CPU) is the 15-minute
CPU chain; ``small`` (the default with ``--device cuda``) renders 10x the scenes and trains the ``small``
unified model (6 layers x 256) with 16x the batch (launch/configs/stage*/small.yaml). Every step runs one
process with ``--threads`` torch threads (default: the cores this process may use): never more threads than cores (on 2 cores one process
with 2 threads trains the bf16 stage-2 model at 58 samples/s, two 1-thread DeepSpeed ranks at 57 with a
quarter of the optimizer steps, docs/performance.md). Every stage starts from
an empty directory under ``--runs`` (``--keep`` reuses finished stages instead), so the same seed gives the
same numbers. Prints the table (recon PSNR and scorer acceptance, shapes-MME acc/acc+ per subtask,
shapes-GenEval per tag with its shuffled-prompt control, wall time per stage) and writes it to
``<runs>/demo.md`` with ``<runs>/demo.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from unimllm.command_line import FlagParser
from unimllm.runtime import AVX2_EMULATION, cpu_thread_defaults

ROOT = Path(__file__).resolve().parents[1]
# preset -> (train scenes, val scenes, extra shapes-world flags); always 4 shards. small's flags: as measured
# on the GPU (docs/results.md, session 5)
SHAPES = {"tiny": (4000, 500, []), "small": (40000, 500, ["--world.qa_pairs", "one"])}
SHARDS = "shapes-train-{000000..000003}.tar"


def joint_steps_only(preset: str) -> list[str]:
    """Overrides that train a preset's stage 1 for its joint steps only: the control has no semantic loss, so
    no semantic-refinement phase either (its pixel path trains exactly as with the teacher)."""
    cfg = yaml.safe_load((ROOT / "launch" / "configs" / "stage1" / f"{preset}.yaml").read_text())
    refine = cfg.get("loss", {}).get("semantic_refine_steps", 0)
    if not refine:
        return []
    return ["--loss.semantic_refine_steps", "0", "--train.steps", str(cfg["train"]["steps"] - refine)]


def steps(runs: Path, threads: int, device: str, preset: str = "tiny",
          teacher_on: bool = True) -> list[tuple[str, Path, list[str]]]:
    """(name, output directory, argv) of every step, in order. ``teacher_on=False``: no teacher step, and stage 1
    trains without the semantic loss (the control that shows what the semantic half of EvoTok buys)."""
    n_train, n_val, world = SHAPES[preset]
    shapes, s1, s2, s3 = runs / "shapes", runs / "stage1", runs / "stage2", runs / "stage3"
    teacher = runs / "teacher"
    tok = s1 / "export" / "tokenizer"
    codes = str(shapes / "codes" / SHARDS)
    val = ["--val.shards", str(shapes / "val" / "shapes-val-000000.tar"),
           "--val.geneval_prompts", str(shapes / "val" / "geneval_prompts.jsonl")]
    train = ["--train.device", device, "--train.threads", str(threads)]
    py = sys.executable
    semantic = (["--model.teacher.pretrained", str(teacher / "export" / "teacher")] if teacher_on
                else ["--loss.semantic_weight", "0", "--model.teacher.pretrained", "", *joint_steps_only(preset)])
    chain = [
        ("shapes", shapes, [py, "-m", "data.shapes", "--out", str(shapes), "--n", str(n_train),
                            "--n_val", str(n_val), "--shard_size", str(n_train // 4), "--level", "demo",
                            *world]),
        ("teacher", teacher, [py, "launch/teacher.py", "--config", "launch/configs/teacher/shapes.yaml",
                              "--run.out_dir", str(teacher), "--data.sources.0.shards", str(shapes / "train" / SHARDS),
                              "--val.shards", str(shapes / "val" / "shapes-val-000000.tar"), *train]),
        ("stage1", s1, [py, "launch/stage1.py", "--config", f"launch/configs/stage1/{preset}.yaml", "--run.out_dir", str(s1),
                        "--data.sources.0.shards", str(shapes / "train" / SHARDS),
                        *semantic, "--val.shards", str(shapes / "val" / "shapes-val-000000.tar"), *train]),
        ("codes", shapes / "codes", [py, "-m", "unimllm.stages.precompute_codes", "--tokenizer", str(tok), "--no_progress", "--device", device,
                                     "--shards", str(shapes / "train" / SHARDS), "--out", str(shapes / "codes")]),
        ("stage2", s2, [py, "launch/stage2.py", "--config", f"launch/configs/stage2/{preset}.yaml", "--run.out_dir", str(s2),
                        "--model.tokenizer", str(tok), "--data.sources.0.shards", codes, *val, *train]),
        ("stage3", s3, [py, "launch/stage3.py", "--config", f"launch/configs/stage3/{preset}.yaml", "--run.out_dir", str(s3),
                        "--init_from", str(s2 / "export" / "unified"), "--data.sources.0.shards", codes, *val, *train]),
        ("eval", s3 / "eval", [py, "launch/evaluate.py", "--config", "launch/configs/eval/shapes.yaml",
                               "--ckpt", str(s3 / "export" / "unified"), "--out", str(s3 / "eval"), "--device", device,
                               "--threads", str(threads),
                               "--shapes.shards", str(shapes / "val" / "shapes-val-000000.tar"),
                               "--shapes.geneval_prompts", str(shapes / "val" / "geneval_prompts.jsonl")]),
    ]
    return [step for step in chain if teacher_on or step[0] != "teacher"]


def done_marker(name: str, out: Path) -> Path:
    return {"shapes": out / "manifest.json", "codes": out / "codes_manifest.json", "eval": out / "scores.json",
            "teacher": out / "export" / "teacher"}.get(
        name, out / "export")


def last_val(metrics: Path) -> dict:
    """The last validation record of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"val/' in line]
    return rows[-1] if rows else {}


def table(runs: Path, times: dict[str, float]) -> tuple[str, dict]:
    """The results table (markdown) and its numbers."""
    scores = json.loads((runs / "stage3" / "eval" / "scores.json").read_text())
    s1 = last_val(runs / "stage1" / "metrics.jsonl")
    teacher = last_val(runs / "teacher" / "metrics.jsonl") if (runs / "teacher" / "metrics.jsonl").is_file() else {}
    mme, gen = scores["shapes_mme"], scores["shapes_geneval"]
    subtasks = [k[:-4] for k in mme if k.endswith("/acc") and "/" in k]
    acc = sum(mme[f"{t}/acc"] for t in subtasks) / len(subtasks)
    acc_plus = sum(mme[f"{t}/acc_plus"] for t in subtasks) / len(subtasks)
    ctrl = gen["control"]
    out = {"recon_psnr": scores["recon"]["psnr"], "stage1_scorer_accept": s1.get("val/shapes_accept"),
           "teacher_cell_shape_acc": teacher.get("val/shape_acc"), "teacher_cell_color_acc": teacher.get("val/color_acc"),
           "mme_acc": acc, "mme_acc_plus": acc_plus, "mme": {t: [mme[f"{t}/acc"], mme[f"{t}/acc_plus"]] for t in subtasks},
           "geneval": gen["overall"], "geneval_control": ctrl["overall"], "geneval_tags": gen["tags"],
           "geneval_control_tags": ctrl["tags"], "wall_s": times}
    lines = ["| metric | value |", "|---|---|"]
    if teacher:
        lines.append(f"| semantic teacher: held-out per-cell shape / colour accuracy (object cells) | "
                     f"{teacher['val/shape_acc']:.3f} / {teacher['val/color_acc']:.3f} |")
    lines += [
             f"| recon PSNR (held-out, stage-1 tokenizer) | {out['recon_psnr']:.2f} dB |",
             f"| shapes-scorer acceptance of reconstructions (stage 1 val) | {100 * (out['stage1_scorer_accept'] or 0):.1f}% |",
             f"| shapes-MME acc / acc+ (mean of {len(subtasks)} subtasks) | {acc:.1f} / {acc_plus:.1f} |"]
    lines += [f"| &nbsp; {t} acc / acc+ | {mme[f'{t}/acc']:.1f} / {mme[f'{t}/acc_plus']:.1f} |" for t in subtasks]
    lines.append(f"| shapes-GenEval overall (shuffled-prompt control) | {gen['overall']:.3f} ({ctrl['overall']:.3f}) |")
    lines += [f"| &nbsp; {t} | {v:.2f} ({ctrl['tags'].get(t, 0.0):.2f}) |" for t, v in gen["tags"].items()]
    lines += [f"| wall: {k} | {v / 60:.1f} min ({v:.0f} s) |" for k, v in times.items()]
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> int:
    ap = FlagParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/demo", help="output tree (each stage in its own subdirectory)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads of every step (default: the cores this process may use)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", choices=sorted(SHAPES), help="tiny (default on cpu) or small (default on cuda)")
    ap.add_argument("--keep", action="store_true", help="skip stages whose outputs exist instead of redoing them")
    ap.add_argument("--no_teacher", action="store_true",
                    help="control: no semantic teacher, stage 1 with semantic loss 0 (a plain residual-VQ autoencoder)")
    ap.add_argument("--emulate_avx2", action="store_true",
                    help="run every step as on a plain AVX2 CPU without native bf16 (ATEN_CPU_CAPABILITY=avx2 "
                         "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2): what most laptops and VMs run")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    preset = args.preset or ("small" if args.device == "cuda" else "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cpu_thread_defaults(env)  # OMP_WAIT_POLICY=PASSIVE unless set: a busy core slows the chain, never stalls it
    if args.emulate_avx2:
        env.update(AVX2_EMULATION)
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("WANDB_MODE", "offline")
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    for name, out, cmd in steps(runs, args.threads, args.device, preset, not args.no_teacher):
        if args.keep and done_marker(name, out).exists():
            print(f"[demo] {name}: kept {out}", flush=True)
            continue
        if out.exists():
            shutil.rmtree(out)
        print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, env=env)
        times[name] = time.perf_counter() - t0
        if res.returncode != 0:
            print(f"[demo] {name} failed (exit {res.returncode}); its output is in {out}", file=sys.stderr)
            return res.returncode
        print(f"[demo] {name}: {times[name] / 60:.1f} min", flush=True)
    times["total"] = time.perf_counter() - t_all
    md, nums = table(runs, times)
    (runs / "demo.md").write_text(md + "\n")
    (runs / "demo.json").write_text(json.dumps(nums, indent=2) + "\n")
    ev = runs / "stage3" / "eval"
    wandb = sorted((runs / "stage3" / "wandb").glob("offline-run-*")) if (runs / "stage3" / "wandb").is_dir() else []
    print("\n" + md + "\n")
    print(f"report: {ev / 'report.md'}\nsample grids: {ev / 'geneval_grid.png'}, {ev / 'recon_grid.png'}, "
          f"{runs / 'stage2' / 'images'}\nW&B offline run: {wandb[-1] if wandb else '(disabled)'}\n"
          f"table: {runs / 'demo.md'} ({runs / 'demo.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
