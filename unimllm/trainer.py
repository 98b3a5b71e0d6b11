"""The one training loop shared by every stage.

A stage is a :class:`Task`: it builds its models/optimizers and data, and supplies a ``micro_step``
(stage 1: a generator step then a discriminator step on two engines; stages 2-3: one LM step). The
loop owns everything else: DeepSpeed engines (built in ``unimllm.distributed``), gradient accumulation,
the LR schedule, logging cadence (throughput, MFU, peak memory, data-time fraction, skip counts), eval
and image cadence, atomic checkpoints with retention, and exact resume (engines, RNG states and the
data-loader position of every rank).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from unimllm.checkpoint import Checkpointer, latest_checkpoint, read_step
from unimllm.config import ConfigError, dump_config, to_dict
from unimllm.distributed import (
    DistInfo,
    all_reduce_sums,
    any_rank,
    build_engine,
    deepspeed_config,
    grad_norm,
    shutdown_distributed,
)
from unimllm.logging import Logger, build_logger, print0, progress_bar
from unimllm.precision import resolve_train_precision


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, a pure function of the optimizer step (nothing to checkpoint)."""

    kind: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warm-up: none, cosine, or linear, down to min_lr_ratio x lr at the last step."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 (exclusive with warmup_ratio)."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of train.steps (e.g. 0.03)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (cosine/linear)."""
    decay_steps: int = 0
    """Steps the warm-up + decay span (0 = train.steps); later steps stay at min_lr_ratio (e.g. a final phase
    whose task sets its own rates, as stage 1's semantic refinement)."""

    def validate(self) -> None:
        if self.decay_steps < 0:
            raise ConfigError("decay_steps", f"must be >= 0, got {self.decay_steps}")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("warmup_ratio", "set warmup_steps or warmup_ratio, not both")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            raise ConfigError("warmup_ratio", "warm-up must be >= 0 steps and a ratio in [0, 1)")

    def factor(self, step: int, total: int) -> float:
        """LR multiplier for optimizer step ``step`` (0-based) of ``total`` (``decay_steps`` when set)."""
        total = self.decay_steps or total
        if step >= total:
            return self.min_lr_ratio if self.kind != "constant" else 1.0
        warm = self.warmup_steps or int(self.warmup_ratio * total)
        if step < warm:
            return (step + 1) / warm
        if self.kind == "constant" or total <= warm:
            return 1.0
        t = (step - warm) / max(1, total - warm - 1)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if self.kind == "cosine" else 1 - t
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


@dataclass
class OptimConfig:
    """Adam(W) settings (the reference tokenizer recipe: lr 1e-4, betas 0.9/0.95, no weight decay)."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    eps: float = 1e-8
    """Adam epsilon."""

    def build(self, params, device: torch.device) -> torch.optim.Optimizer:
        """A client torch optimizer (no DeepSpeed JIT op: fused kernel on CUDA, foreach on CPU)."""
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay, fused=device.type == "cuda")


@dataclass
class TrainConfig:
    """The loop's knobs (stage-independent)."""

    steps: int = 100
    """Optimizer steps to train for."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-autocast"] = "fp32"
    """Training precision: DeepSpeed mixed precision for bf16/fp16 (low-precision weights, fp32 master copy);
    bf16-autocast keeps fp32 weights and optimizer and runs the forward under torch.autocast(bfloat16)
    (matmuls in bf16: 1.7x faster stage-2 steps on a CPU with AVX512-BF16, docs/performance.md); auto =
    bf16-autocast where the device computes bf16 natively (CUDA with bf16, a CPU with AVX512_BF16 or AMX),
    else fp32 (an emulated bf16 matmul is ~16-100x slower; unimllm.precision). The run's config.yaml records
    what auto resolved to."""
    precision_reason: str = ""
    """Written by the trainer, not read: why ``precision`` is what it is (auto's choice), kept in config.yaml."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = off)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    record_keys: bool = False
    """Append every micro-batch's sample keys to ``<run>/keys/rank_XXXXX.txt`` (one line per micro-batch:
    step, then the keys): what each rank read, for checking epoch coverage and resume across nodes."""
    zero3_persist_below: int = -1
    """ZeRO-3 only: parameters with fewer elements than this are kept whole on every rank instead of
    partitioned (DeepSpeed's stage3_param_persistence_threshold); -1 = DeepSpeed's default (100k); 0 partitions
    every parameter (the tests use it so that tiny models exercise the partitioned path)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto = CUDA when available."""
    seed: int = 0
    """Seed of model init and every RNG (per rank: seed + rank)."""
    threads: int = 0
    """torch intra-op threads per process; 0 = available cores / local processes."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    log_every: int = 10
    """Log averaged metrics every N steps."""
    eval_every: int = 0
    """Run the stage's validation every N steps (0 = only at the end)."""
    image_every: int = 0
    """Log the stage's sample images every N steps (0 = only at the end)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted after a newer one is complete)."""
    resume: str = "auto"
    """'auto': continue from the latest complete checkpoint of this run if any; 'never'; or a path."""
    peak_tflops: float = 0.0
    """Peak device TFLOP/s for MFU (0 = known GPUs auto-detected; no MFU on CPU)."""

    def validate(self) -> None:
        if self.steps <= 0 or self.grad_accum <= 0:
            raise ConfigError("steps", "steps and grad_accum must be > 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0-3, got {self.zero_stage}")
        if self.zero3_persist_below < -1:
            raise ConfigError("zero3_persist_below", f"must be >= -1, got {self.zero3_persist_below}")
        for k in ("log_every", "eval_every", "image_every", "save_every", "keep_last", "threads"):
            if getattr(self, k) < 0:
                raise ConfigError(k, "must be >= 0")
        if self.log_every == 0:
            raise ConfigError("log_every", "must be >= 1")


@dataclass
class RunConfig:
    """Where a run writes and how it is named."""

    out_dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, checkpoints/, export/, images/."""
    name: str = ""
    """Run name for W&B (default: the out_dir's name)."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """W&B mode (the WANDB_MODE environment variable wins)."""
    wandb_project: str = "unimllm"
    """W&B project."""


class Task:
    """What a stage plugs into the loop. Override what the stage needs; defaults are no-ops."""

    autocast: tuple[str, torch.dtype] | None = None
    """(device type, dtype) for the forward pass, set by the Trainer from ``train.precision``."""

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Wrap ``micro_step``'s forward in this: torch.autocast under bf16-autocast, else nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.autocast[0], dtype=self.autocast[1])

    def setup(self, dist: DistInfo) -> None:
        """Build models, optimizers and data for this rank (called once, before engines are built)."""

    def optimizers(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        """name -> (module, client optimizer); each becomes one DeepSpeed engine, in this order."""
        raise NotImplementedError

    def micro_batch_size(self) -> int:
        raise NotImplementedError

    def train_batches(self) -> Iterator[Any]:
        """Endless micro-batches (e.g. ``StreamingLoader.batches()``)."""
        raise NotImplementedError

    def micro_step(self, engines: dict[str, Any], batch: Any, step: int) -> dict[str, float]:
        """Forward/backward/``engine.step()`` on one micro-batch; returns scalar metrics."""
        raise NotImplementedError

    def count(self, batch: Any) -> dict[str, int]:
        """Work units in a micro-batch for throughput, e.g. {"images": 32} or {"tokens": 4096}."""
        return {}

    def flops_per_step(self, batch: Any) -> float:
        """Model FLOPs (forward + backward) of one micro-batch on this rank, for MFU (0 = unknown)."""
        return 0.0

    def evaluate(self, engines: dict[str, Any], step: int) -> dict[str, float]:
        return {}

    def images(self, engines: dict[str, Any], step: int) -> dict[str, Any]:
        return {}

    def data_stats(self) -> dict[str, float]:
        """Extra metrics logged at each log step, e.g. skipped samples per reason."""
        return {}

    def state_dict(self) -> dict:
        """Per-rank state to checkpoint besides engines and RNG (e.g. the data-loader position)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def meta(self) -> dict:
        """Self-description stored in every checkpoint's meta.json (model configs, ...)."""
        return {}

    def export(self, engines: dict[str, Any], out_dir: Path) -> None:
        """Write the standalone deliverable (e.g. the tokenizer directory). Called on every rank (a
        ZeRO-3 gather is collective); only rank 0 writes."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm or weight: the run stops before anything is saved or exported."""


def _any_nonfinite(values: dict[str, float]) -> list[str]:
    """Keys of a micro-step's losses / gradient norms that are NaN or infinite."""
    return [k for k, v in values.items() if ("loss" in k or "grad_norm" in k) and not math.isfinite(float(v))]


def nonfinite_weights(engines: dict[str, Any]) -> list[str]:
    """``engine/parameter`` names of this rank's weights (its ZeRO-3 partition, if any) that are not all finite."""
    bad = []
    for name, engine in engines.items():
        for pname, p in engine.module.named_parameters():
            local = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition; else the full tensor
            if local.numel() and not torch.isfinite(local.detach()).all():
                bad.append(f"{name}/{pname}")
    return bad


GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16


def _peak_tflops(cfg: TrainConfig, device: torch.device) -> float:
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), 0.0)
    return 0.0


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


class Trainer:
    def __init__(self, task: Task, *, run: RunConfig, train: TrainConfig, dist: DistInfo, config: Any):
        self.task, self.run, self.cfg, self.dist, self.config = task, run, train, dist, config
        self.out = Path(run.out_dir)
        self.checkpointer = Checkpointer(self.out / "checkpoints", dist, train.keep_last)
        self.step = 0
        self.engines: dict[str, Any] = {}
        self.base_lrs: dict[str, list[float]] = {}
        self.logger: Logger | None = None

    # ------------------------------------------------------------------------------------ set-up
    def _build(self, resume: Path | None = None) -> None:
        cfg = self.cfg
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(cfg.threads or max(1, (len(os.sched_getaffinity(0)) // local)))
        cfg.precision, cfg.precision_reason = resolve_train_precision(cfg.precision, self.dist.device)
        print0(f"precision: {cfg.precision} ({cfg.precision_reason})", is_main=self.dist.is_main)
        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.task.setup(self.dist)
        if cfg.precision == "bf16-autocast":
            self.task.autocast = (self.dist.device.type, torch.bfloat16)
        ds = deepspeed_config(micro_batch=self.task.micro_batch_size(), grad_accum=cfg.grad_accum,
                              zero_stage=cfg.zero_stage, precision=cfg.precision, grad_clip=cfg.grad_clip,
                              zero3_persist_below=cfg.zero3_persist_below)
        for name, (module, opt) in self.task.optimizers().items():
            self.base_lrs[name] = [g["lr"] for g in opt.param_groups]
            self.engines[name] = build_engine(module, opt, ds)
        torch.manual_seed(cfg.seed + self.dist.rank)  # per-rank streams from here on
        if self.dist.is_main:
            dump_config(self.config, self.out / "config.yaml")
        self.logger = build_logger(self.out, is_main=self.dist.is_main, wandb_mode=self.run.wandb_mode,
                                   project=self.run.wandb_project, name=self.run.name or self.out.name,
                                   config=to_dict(self.config), console_keys=("train/", "val/", "perf/"),
                                   resume_step=None if resume is None else read_step(resume))

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from, checked before anything is built or written."""
        resume = self.cfg.resume
        if resume == "never":
            return None
        path = latest_checkpoint(self.checkpointer.root) if resume == "auto" else Path(resume)
        if path is not None and not (path / "meta.json").is_file():
            what = "does not exist" if not path.exists() else "is not a complete checkpoint (no meta.json)"
            raise ConfigError("train.resume", f"{path} {what}")
        return path

    def _maybe_resume(self, path: Path | None) -> None:
        if path is None:
            return
        meta, state = self.checkpointer.load(path, self.engines)
        self.task.load_state_dict(state.get("task", {}))
        self.step = int(meta["step"])
        print0(f"resumed from {path} at step {self.step}", is_main=self.dist.is_main)

    def _set_lr(self) -> float:
        f = self.cfg.schedule.factor(self.step, self.cfg.steps)
        for name, engine in self.engines.items():
            for group, base in zip(engine.optimizer.param_groups, self.base_lrs[name]):
                group["lr"] = base * f
        return f

    def _check_finite(self, nonfinite: list[str]) -> None:
        """Stop on a non-finite loss or gradient norm of the step just taken, on every rank alike (one small
        all-reduce): its update may have made the weights non-finite, so nothing after it is saved."""
        for name, engine in self.engines.items():
            gn = grad_norm(engine)
            if gn is not None and not math.isfinite(gn):
                nonfinite.append(f"grad_norm_{name}")
        if any_rank(bool(nonfinite), self.dist.device):
            self._diverged(f"non-finite {', '.join(sorted(set(nonfinite))) or 'values on another rank'} "
                           f"at step {self.step + 1}")

    def _diverged(self, what: str) -> None:
        last = latest_checkpoint(self.checkpointer.root)
        raise TrainingDiverged(
            f"train: {what}; stopping before anything is saved or exported (the last checkpoint, "
            f"{last or 'none yet'}, is untouched). Lower optim.lr, lengthen the warm-up or lower train.grad_clip")

    def save(self) -> Path:
        # belt and braces: a non-finite weight never reaches a checkpoint (nor retention's pruning)
        if any_rank(bool(nonfinite_weights(self.engines)), self.dist.device):
            self._diverged(f"non-finite weights at step {self.step}")
        meta = {"stage": type(self.task).__name__, "config": to_dict(self.config), **self.task.meta()}
        return self.checkpointer.save(self.step, self.engines, meta, {"task": self.task.state_dict()})

    # -------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, float]:
        resume = self._resume_path()
        self._build(resume)
        try:
            return self._fit(resume)
        except BaseException:
            # this rank leaves the process group: the others' collectives fail instead of waiting out the timeout
            shutdown_distributed()
            raise
        finally:
            if self.logger is not None:
                self.logger.close()  # also on failure: W&B finishes its run, metrics.jsonl is flushed
                self.logger = None

    def _fit(self, resume: Path | None) -> dict[str, float]:
        self._maybe_resume(resume)
        cfg, task = self.cfg, self.task
        assert self.logger is not None
        batches = task.train_batches()
        sums: dict[str, float] = defaultdict(float)
        seen: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        n_metric, t_data, flops = 0, 0.0, 0.0
        t_window = time.perf_counter()
        last: dict[str, float] = {}
        bar = progress_bar(total=cfg.steps, initial=self.step, main=self.dist.is_main, desc="train", unit="step")
        while self.step < cfg.steps:
            lr_factor = self._set_lr()
            nonfinite: list[str] = []
            for _ in range(cfg.grad_accum):
                t0 = time.perf_counter()
                batch = next(batches)
                t_data += time.perf_counter() - t0
                if cfg.record_keys:
                    self._record_keys(batch)
                values = task.micro_step(self.engines, batch, self.step)
                nonfinite += _any_nonfinite(values)
                for k, v in values.items():
                    sums[k] += float(v)
                    seen[k] += 1  # a metric may be absent from some micro-steps (e.g. no generation sample)
                for k, v in task.count(batch).items():
                    counts[k] += v
                flops += task.flops_per_step(batch)
                n_metric += 1
            self._check_finite(nonfinite)
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                dt = time.perf_counter() - t_window
                last = self._log_window(sums, seen, counts, n_metric, t_data, flops, dt, lr_factor)
                sums, seen, counts = defaultdict(float), defaultdict(float), defaultdict(float)
                n_metric, t_data, flops, t_window = 0, 0.0, 0.0, time.perf_counter()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._evaluate()
            if cfg.image_every and self.step % cfg.image_every == 0 and self.step < cfg.steps:
                self._images()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
        bar.close()
        final = {**last, **self._evaluate()}
        self._images()
        self.save()
        task.export(self.engines, self.out / "export")  # collective (ZeRO-3 gathers); writes on rank 0
        return final

    def _record_keys(self, batch: Any) -> None:
        keys = batch.get("__key__", []) if isinstance(batch, dict) else []
        path = self.out / "keys" / f"rank_{self.dist.rank:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(" ".join([str(self.step + 1), *map(str, keys)]) + "\n")

    def _log_window(self, sums, seen, counts, n, t_data, flops, dt, lr_factor) -> dict[str, float]:
        local = {f"train/{k}": v for k, v in sums.items()}
        local.update({f"seen/{k}": v for k, v in seen.items()})
        local.update({f"count/{k}": v for k, v in counts.items()})
        local["perf/flops"] = flops
        tot = all_reduce_sums(local)  # each metric: the mean over the micro-steps (all ranks) that reported it
        metrics = {k: v / tot[f"seen/{k[6:]}"] for k, v in tot.items() if k.startswith("train/")}
        counts = {k[6:]: v for k, v in tot.items() if k.startswith("count/")}
        for k, v in counts.items():
            metrics[f"perf/{k}_per_s"] = v / dt
        peak = _peak_tflops(self.cfg, self.dist.device)
        if peak and tot["perf/flops"]:
            metrics["perf/mfu"] = tot["perf/flops"] / dt / (peak * 1e12 * self.dist.world_size)
        metrics["perf/data_time_frac"] = t_data / max(dt, 1e-9)
        metrics["perf/peak_mem_gb"] = _peak_memory_gb(self.dist.device)
        metrics["perf/step_s"] = dt / max(1, n / self.cfg.grad_accum)
        for name, engine in self.engines.items():
            metrics[f"train/lr_{name}"] = self.base_lrs[name][0] * lr_factor
            gn = grad_norm(engine)
            if gn is not None:
                metrics[f"train/grad_norm_{name}"] = gn
        metrics.update(self.task.data_stats())
        assert self.logger is not None
        self.logger.log(metrics, self.step)
        return metrics

    def _evaluate(self) -> dict[str, float]:
        metrics = self.task.evaluate(self.engines, self.step)
        if metrics and self.logger is not None:
            self.logger.log(metrics, self.step)
        return metrics

    def _images(self) -> None:
        for key, image in self.task.images(self.engines, self.step).items():
            assert self.logger is not None
            self.logger.log_image(key, image, self.step)
