"""Stage 1 as a trainer Task: the EvoTok tokenizer's generator step then discriminator step.

Two DeepSpeed engines ("tokenizer": the EvoTokenizer without its frozen teacher's parameters in the
optimizer; "discriminator": the PatchGAN, only when the GAN is on). LPIPS and the teacher are frozen
and live outside the optimizers. Validation: PSNR / SSIM of depth-L_pix reconstructions on held-out
shards and, for shapes-world records, the fraction the shapes scorer accepts; a grid of originals vs
reconstructions is logged as an image. Export: a standalone ``save_pretrained`` directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from data.config import DataConfig
from data.loader import StreamingLoader, eval_loader, existing_shards
from data.transforms import denormalize, normalize
from eval.metrics import psnr, ssim
from tokenizer.config import TokenizerConfig, preset
from tokenizer.losses import TokenizerLoss, semantic_loss
from tokenizer.model import EvoTokenizer
from unimllm.config import ConfigError, to_dict
from unimllm.distributed import DistInfo, all_reduce_sums, gathered_parameters
from unimllm.trainer import OptimConfig, RunConfig, ScheduleConfig, Task, TrainConfig


@dataclass
class LossConfig:
    """The tokenizer objective (defaults = the EvoTok release, see docs)."""

    rec: Literal["mse", "l1"] = "mse"
    """Pixel reconstruction loss."""
    rec_weight: float = 1.0
    """Weight of the pixel loss."""
    perceptual_weight: float = 1.0
    """LPIPS-VGG16 weight (0 = no LPIPS)."""
    lpips_vgg_path: str = ""
    """Local torchvision-format VGG16 state dict (safetensors or .pth)."""
    lpips_heads_path: str = ""
    """Local LPIPS linear heads (taming-transformers vgg.pth format)."""
    lpips_random_weights: bool = False
    """Explicitly use random VGG/LPIPS weights (smoke runs only: the perceptual term is then meaningless)."""
    disc_weight: float = 0.5
    """PatchGAN hinge loss weight (0 = no discriminator)."""
    disc_start: int = 20000
    """Step from which the GAN terms are on."""
    disc_adaptive: bool = False
    """VQGAN adaptive GAN weight (off in the release)."""
    disc_channels: int = 64
    """Discriminator base channels (ndf)."""
    disc_layers: int = 3
    """Discriminator strided layers."""
    disc_norm: Literal["batch", "group"] = "batch"
    """Discriminator normalisation (group for tiny batches)."""
    commit_weight: float = 1.0
    """Weight of the cumulative commitment loss."""
    semantic_weight: float = 1.0
    """Weight of cosine + chunked cosine against the teacher (0 = no teacher forward)."""
    semantic_chunks: int = 4
    """Channel chunks of the chunked cosine."""
    semantic_refine_steps: int = 0
    """The last N of train.steps train the semantic decoder alone, on the codes of the (then frozen) encoder
    and codebooks, at optim.lr with its own cosine decay (set train.schedule.decay_steps to the steps before
    them). The decoder learns to gather an object's shape from neighbouring codes much faster once the codes
    stop moving (docs/results.md); each such step costs a fraction of a joint one (no pixel decoder)."""


@dataclass
class ValConfig:
    """In-loop validation on held-out shards."""

    shards: str = ""
    """Held-out shards (brace pattern); empty = no validation."""
    max_images: int = 256
    """Images evaluated (over all ranks)."""
    batch_size: int = 32
    """Validation batch per rank."""
    grid_images: int = 8
    """Originals vs reconstructions shown in the logged image grid."""


@dataclass
class Stage1Config:
    """Stage 1: train the EvoTok tokenizer (``launch/stage1.py``)."""

    model_preset: str = "tiny"
    """Tokenizer preset the `model` section starts from (tiny, base-256); YAML/CLI override its fields."""
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Adam settings, shared by the tokenizer and the discriminator (as the release)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training shards (images only: read_json false is enough)."""
    val: ValConfig = field(default_factory=ValConfig)
    """Held-out validation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output directory and logging."""
    def validate(self) -> None:
        refine = self.loss.semantic_refine_steps
        if refine and (self.loss.semantic_weight <= 0 or refine >= self.train.steps):
            raise ConfigError("loss.semantic_refine_steps",
                              f"{refine} needs semantic_weight > 0 and fewer than train.steps ({self.train.steps})")
        if self.data.image.resolution != self.model.encoder.image_size:
            raise ConfigError("data.image.resolution",
                              f"{self.data.image.resolution} != model.encoder.image_size {self.model.encoder.image_size}")
        if not self.data.sources:
            raise ConfigError("data.sources", "no training shards configured")


def model_presets(name: str) -> dict:
    """Defaults layer for ``model_preset`` (used by ``parse_cli``)."""
    return {"model": to_dict(preset(name))}


class Stage1Task(Task):
    def __init__(self, cfg: Stage1Config):
        self.cfg = cfg
        self._flops: float | None = None

    def setup(self, dist: DistInfo) -> None:
        cfg, self.dist = self.cfg, dist
        self.device = dist.device
        if cfg.val.shards:
            existing_shards(cfg.val.shards, "val.shards")
        self.model = EvoTokenizer(cfg.model, with_teacher=cfg.loss.semantic_weight > 0, config_key="model").to(self.device)
        L = cfg.loss
        self.loss = TokenizerLoss(
            rec_loss=L.rec, rec_weight=L.rec_weight, perceptual_weight=L.perceptual_weight,
            lpips_vgg_path=L.lpips_vgg_path, lpips_heads_path=L.lpips_heads_path,
            lpips_random_weights=L.lpips_random_weights,
            lpips_fields=("loss.lpips_vgg_path", "loss.lpips_heads_path"),
            disc_weight=L.disc_weight, disc_start=L.disc_start, disc_adaptive=L.disc_adaptive,
            disc_ndf=L.disc_channels, disc_layers=L.disc_layers, disc_norm=L.disc_norm,
            commit_weight=L.commit_weight, semantic_weight=L.semantic_weight, semantic_chunks=L.semantic_chunks,
        ).to(self.device)
        self.loader = StreamingLoader(cfg.data, rank=dist.rank, world_size=dist.world_size)

    def optimizers(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        # Two groups, one rate: the semantic refinement sets the first to 0 (Adam's momentum would otherwise keep
        # moving the frozen parts) and decays the second on its own.
        sem = {id(p) for p in self.model.semantic_decoder.parameters()}
        params = self.model.trainable_parameters()
        groups = [{"params": [p for p in params if id(p) not in sem]}, {"params": [p for p in params if id(p) in sem]}]
        out = {"tokenizer": (self.model, self.cfg.optim.build(groups, self.device))}
        if self.cfg.loss.disc_weight > 0:
            disc = self.loss.discriminator
            out["discriminator"] = (disc, self.cfg.optim.build(disc.parameters(), self.device))
        return out

    def micro_batch_size(self) -> int:
        return self.cfg.data.batch_size

    def train_batches(self):
        return self.loader.batches()

    def micro_step(self, engines: dict[str, Any], batch: Any, step: int) -> dict[str, float]:
        gen = engines["tokenizer"]
        x = normalize(batch["image"].to(self.device))  # (B, 3, H, W) in [-1, 1]
        start = self.cfg.train.steps - self.cfg.loss.semantic_refine_steps
        if self.cfg.loss.semantic_refine_steps and step >= start:
            return self._refine_step(gen, x, step - start)
        with self.forward_context():
            out = gen(x)
            target = self.model.teacher_features(x) if self.cfg.loss.semantic_weight > 0 else None
            loss, logs = self.loss.generator_loss(x, out.recon, out.commit_loss, out.sem_pred, target, step,
                                                  last_layer=self.model.pixel_decoder.last_layer)
        gen.backward(loss)
        gen.step()
        if self.loss.gan_active(step):
            disc = engines["discriminator"]
            with self.forward_context():
                d, dlogs = self.loss.discriminator_loss(x, out.recon, step)
            disc.backward(d)
            disc.step()
            logs.update(dlogs)
        metrics = {f"loss/{k}": float(v) for k, v in logs.items()}
        metrics["loss"] = float(logs["total"])
        q = out.quant
        for d in range(q.usage.numel()):
            metrics[f"codebook/usage_d{d + 1}"] = float(q.usage[d])
            metrics[f"codebook/perplexity_d{d + 1}"] = float(q.perplexity[d])
        metrics["codebook/restarts"] = float(q.restarts.sum())
        return metrics

    def _refine_step(self, gen, x: torch.Tensor, i: int) -> dict[str, float]:
        """``loss.semantic_refine_steps``: the semantic decoder alone on frozen codes (no EMA update)."""
        n, L = self.cfg.loss.semantic_refine_steps, self.cfg.loss
        lr = self.cfg.optim.lr * ScheduleConfig(kind="cosine", min_lr_ratio=0.05).factor(i, n)
        rest, sem = gen.optimizer.param_groups  # optimizers(): everything else, then the semantic decoder
        rest["lr"], sem["lr"] = 0.0, lr
        with torch.no_grad():
            z_q = self.model.quantizer.decode(self.model.encode(x), self.cfg.model.quantizer.depth_sem)  # (B, h, w, D)
            target = self.model.teacher_features(x)  # (B, N, C_t)
        with self.forward_context():
            pred = self.model.semantic_decoder(z_q.to(self.model.semantic_decoder.pos_embed.dtype))  # (B, N, C_t)
            sem = semantic_loss(pred, target, L.semantic_chunks) * L.semantic_weight
        gen.backward(sem)
        gen.step()
        return {"loss/semantic_refine": float(sem.detach()), "semantic_refine_lr": lr}

    def count(self, batch: Any) -> dict[str, int]:
        return {"images": len(batch["__key__"])}

    def flops_per_step(self, batch: Any) -> float:
        """Forward FLOPs counted once by torch's FlopCounterMode (eval, no EMA update), x3 for fwd+bwd."""
        if self._flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            x = normalize(batch["image"].to(self.device))
            self.model.eval()
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                out = self.model(x)
                if self.cfg.loss.semantic_weight > 0:
                    self.model.teacher_features(x)
                if self.loss.lpips is not None:
                    self.loss.lpips(out.recon, x)
            self.model.train()
            self._flops = 3.0 * fc.get_total_flops() / len(batch["__key__"])
        return self._flops * len(batch["__key__"])

    def data_stats(self) -> dict[str, float]:
        return {f"data/skipped/{k}": float(v) for k, v in self.loader.skip_counts().items()}

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "loader" in state:
            self.loader.load_state_dict(state["loader"])

    def meta(self) -> dict:
        return {"model_config": to_dict(self.cfg.model)}

    # ---------------------------------------------------------------------------------- validation
    def _val_loader(self) -> StreamingLoader:
        v = self.cfg.val
        return eval_loader(v.shards, v.batch_size, self.cfg.data.image.resolution, rank=self.dist.rank,
                           world_size=self.dist.world_size)

    @torch.no_grad()
    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decode_pixels(self.model.encode(x))  # depth L_pix

    def evaluate(self, engines: dict[str, Any], step: int) -> dict[str, float]:
        if not self.cfg.val.shards:
            return {}
        from eval.shapes_scorer import agrees

        self.model.eval()
        per_rank = max(1, self.cfg.val.max_images // self.dist.world_size)
        sums = {"n": 0.0, "psnr": 0.0, "ssim": 0.0, "shapes_n": 0.0, "shapes_ok": 0.0}
        for batch in self._val_loader():
            keep = int(per_rank - sums["n"])  # never more than max_images over all ranks
            x = normalize(batch["image"][:keep].to(self.device))
            rec = self._reconstruct(x)
            a, b = (x + 1) / 2, (rec.float().clamp(-1, 1) + 1) / 2  # [0, 1]
            sums["n"] += len(x)
            sums["psnr"] += float(psnr(b, a).clamp(max=100).sum())
            sums["ssim"] += float(ssim(b, a).sum())
            for img, meta in zip(denormalize(rec), batch["json"][:keep]):
                if "objects" in meta:  # a shapes-world record: is the reconstruction still the same scene?
                    sums["shapes_n"] += 1
                    sums["shapes_ok"] += float(agrees(img, meta)[0])
            if sums["n"] >= per_rank:
                break
        self.model.train()
        tot = all_reduce_sums(sums)
        out = {"val/psnr": tot["psnr"] / max(tot["n"], 1), "val/ssim": tot["ssim"] / max(tot["n"], 1),
               "val/images": tot["n"]}
        if tot["shapes_n"]:
            out["val/shapes_accept"] = tot["shapes_ok"] / tot["shapes_n"]
        return out

    def images(self, engines: dict[str, Any], step: int) -> dict[str, Image.Image]:
        if not self.cfg.val.shards or not (self.dist.is_main or self.cfg.train.zero_stage == 3):
            return {}  # ZeRO-3: every rank runs the same forwards (their parameter all-gathers are collective)
        batch = next(iter(self._val_loader()))
        x = normalize(batch["image"][: self.cfg.val.grid_images].to(self.device))
        self.model.eval()
        rec = self._reconstruct(x)
        self.model.train()
        if not self.dist.is_main:
            return {}
        top, bottom = np.concatenate(list(denormalize(x)), 1), np.concatenate(list(denormalize(rec)), 1)
        return {"val/reconstructions": Image.fromarray(np.concatenate([top, bottom], 0))}

    def export(self, engines: dict[str, Any], out_dir: Path) -> None:
        with gathered_parameters(self.model, self.cfg.train.zero_stage):
            if self.dist.is_main:
                self.model.save_pretrained(out_dir / "tokenizer")
