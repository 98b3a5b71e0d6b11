"""The evaluation config (``launch/evaluate.py``): one root dataclass, a section per suite.

Suites: ``recon`` (tokenizer reconstruction), ``mme``, ``pope``, ``geneval`` (official benchmarks) and
``shapes`` (the built-in shapes world: recon + shapes-MME + shapes-GenEval with its shuffled-prompt control).
The shapes suite reads its data from ``shapes.*`` and its other knobs (counts, batch sizes, sampler) from
the ``recon``, ``mme`` and ``geneval`` sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from eval.geneval import SCORER_OPTIONS
from eval.pope import SPLITS as POPE_SPLITS
from unimllm.config import ConfigError


def _non_negative(section: Any, *keys: str) -> None:
    for k in keys:
        if getattr(section, k) < 0:
            raise ConfigError(k, f"must be >= 0, got {getattr(section, k)}")


def _positive(section: Any, *keys: str) -> None:
    for k in keys:
        if getattr(section, k) < 1:
            raise ConfigError(k, f"must be >= 1, got {getattr(section, k)}")


@dataclass
class ReconSuiteConfig:
    """Reconstruction metrics of the EvoTok tokenizer (``eval.recon``)."""

    source: str = ""
    """Image folder or .tar shard pattern (suite recon; the shapes suite reads ``shapes.shards``)."""
    depth: int = 0
    """Quantiser stages decoded (0 = the tokenizer's L_pix)."""
    batch_size: int = 16
    """Images per forward pass per rank."""
    max_images: int = 0
    """First N images of the source (0 = all)."""
    inception_weights: str = ""
    """Local FID Inception weights (pt_inception-2015-12-05); empty = no rFID."""
    lpips_vgg: str = ""
    """LPIPS VGG16 weights; empty = no LPIPS."""
    lpips_heads: str = ""
    """LPIPS linear heads (empty = read from the lpips_vgg file)."""
    grid_images: int = 8
    """Originals over reconstructions in ``recon_grid.png`` (0 = none)."""

    def validate(self) -> None:
        _non_negative(self, "depth", "max_images", "grid_images")
        _positive(self, "batch_size")


@dataclass
class MMESuiteConfig:
    """MME yes/no questions (``eval.mme``); greedy replies parsed by their first word."""

    path: str = ""
    """Official MME copy: release folder, eval_tool ``Your_Results`` folder, or lmms-lab/MME parquet file/folder."""
    image_root: str = ""
    """Images of the eval_tool layout (empty = ``path``)."""
    max_images: int = 0
    """Questions of the first N images of each subtask (0 = all); shapes: the first N scenes of ``shapes.shards``,
    each asked about every subtask."""
    batch_size: int = 16
    """Questions answered per forward pass per rank."""
    max_new_tokens: int = 16
    """Longest reply."""
    prompt_suffix: str = ""
    """Appended to every question (MME questions already end in "Please answer yes or no.")."""

    def validate(self) -> None:
        _non_negative(self, "max_images")
        _positive(self, "batch_size", "max_new_tokens")


@dataclass
class PopeSuiteConfig:
    """POPE object-hallucination questions (``eval.pope``)."""

    path: str = ""
    """POPE json file / lmms-lab parquet file, or a folder of either."""
    image_root: str = ""
    """COCO val2014 images for the json format (empty = the json file's folder)."""
    splits: list[str] = field(default_factory=lambda: list(POPE_SPLITS))
    """Splits evaluated (adversarial, popular, random)."""
    rule: Literal["official", "strict"] = "official"
    """Reply parsing: POPE's evaluate.py (official) or yes/no-prefix with other = wrong (strict)."""
    max_questions: int = 0
    """First N questions of each split (0 = all)."""
    batch_size: int = 16
    """Questions answered per forward pass per rank."""
    max_new_tokens: int = 16
    """Longest reply."""
    prompt_suffix: str = "\nAnswer the question using a single word or phrase."
    """Appended to every question (LLaVA's POPE prompt by default)."""

    def validate(self) -> None:
        bad = [s for s in self.splits if s not in POPE_SPLITS]
        if bad or not self.splits:
            raise ConfigError("splits", f"need one or more of {', '.join(POPE_SPLITS)}, got {self.splits}")
        _non_negative(self, "max_questions")
        _positive(self, "batch_size", "max_new_tokens")


@dataclass
class GenEvalSuiteConfig:
    """GenEval generation (official layout, resumable) and scoring (``eval.geneval``)."""

    prompts: str = ""
    """GenEval metadata JSONL (empty = the bundled official eval/assets/geneval/evaluation_metadata.jsonl)."""
    n_samples: int = 4
    """Images per prompt (GenEval: 4)."""
    max_per_tag: int = 0
    """First N prompts of each tag (0 = all). A subset is indexed 0..n-1 in the layout (its seeds follow that
    index) and is not comparable to published numbers."""
    batch_size: int = 16
    """Images per sampling call per rank."""
    cfg_scale: float | None = None
    """Classifier-free guidance scale (None = the checkpoint's sampler default)."""
    temperature: float | None = None
    """Sampling temperature (None = the checkpoint's default)."""
    top_k: int | None = None
    """Top-k (None = the checkpoint's default; 0 = off)."""
    top_p: float | None = None
    """Top-p (None = the checkpoint's default; 1 = off)."""
    grid_images: int = 16
    """First generated images shown in ``geneval_grid.png`` and logged (0 = none)."""
    scorer_python: str = ""
    """Python of the official scorer's environment; with geneval_dir and detector_path runs evaluate_images.py
    after generation (all three or none; none = stop after generation and print the scoring command)."""
    geneval_dir: str = ""
    """Checkout of djghosh13/geneval."""
    detector_path: str = ""
    """Folder of the Mask2Former detector checkpoint (evaluation/download_models.sh)."""
    scorer_options: dict[str, Any] = field(default_factory=dict)
    """evaluate_images.py ``--options`` (model, threshold, ...)."""

    def validate(self) -> None:
        _positive(self, "n_samples", "batch_size")
        _non_negative(self, "max_per_tag", "grid_images")
        given = [bool(self.scorer_python), bool(self.geneval_dir), bool(self.detector_path)]
        if any(given) and not all(given):
            raise ConfigError("scorer_python", "set scorer_python, geneval_dir and detector_path together (or none)")
        bad = [k for k in self.scorer_options if k not in SCORER_OPTIONS]
        if bad:
            raise ConfigError("scorer_options", f"unknown option(s) {bad}; evaluate_images.py reads "
                                                f"{list(SCORER_OPTIONS)}")
        if (self.temperature is not None and self.temperature < 0) or (self.top_k is not None and self.top_k < 0) \
                or (self.top_p is not None and not 0 < self.top_p <= 1):
            raise ConfigError("temperature", "need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


@dataclass
class ShapesSuiteConfig:
    """The shapes-world data (``python -m data.shapes``): held-out shards and GenEval-format prompts."""

    shards: str = "runs/shapes/demo/val/shapes-val-000000.tar"
    """Held-out shards: recon images and the shapes-MME questions (records' ``mme`` field)."""
    geneval_prompts: str = "runs/shapes/demo/val/geneval_prompts.jsonl"
    """Shapes GenEval prompts, scored by eval.shapes_scorer against their own and shuffled prompts."""


@dataclass
class EvalLogConfig:
    """Metrics logging (metrics.jsonl always; W&B unless disabled)."""

    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """W&B mode (the WANDB_MODE environment variable wins)."""
    wandb_project: str = "unimllm"
    """W&B project."""
    name: str = ""
    """Run name (default: eval-<suite>-<checkpoint folder>)."""


@dataclass
class EvalConfig:
    """Evaluation of a checkpoint on one suite (``launch/evaluate.py``)."""

    suite: Literal["recon", "mme", "pope", "geneval", "shapes"] = "shapes"
    """What to run (recon, mme, pope, geneval, shapes)."""
    ckpt: str = ""
    """Stage-2 unified export (unified_config.json), or its run folder; suite recon also takes a stage-1
    tokenizer export (config.json + model.safetensors) or its run folder."""
    tokenizer: str = ""
    """EvoTok export to use when the one the unified export references has moved (its sha256 must match)."""
    out: str = ""
    """Output folder (default: <run>/eval/<suite> for a <run>/export/<name> checkpoint, else
    <ckpt>/../eval/<suite>)."""
    seed: int = 0
    """Seed of everything sampled: GenEval per-image seeds (eval.geneval.SEED_RULE) and the shuffled control."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run (auto = CUDA when available)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype of the unified model's weights (the tokenizer stays fp32); auto = bf16 on a CUDA device with
    bf16, fp32 elsewhere (a CPU never evaluates in bf16 unless asked: unimllm.precision)."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""
    recon: ReconSuiteConfig = field(default_factory=ReconSuiteConfig)
    """Reconstruction."""
    mme: MMESuiteConfig = field(default_factory=MMESuiteConfig)
    """MME (and shapes-MME's counts and reply settings)."""
    pope: PopeSuiteConfig = field(default_factory=PopeSuiteConfig)
    """POPE."""
    geneval: GenEvalSuiteConfig = field(default_factory=GenEvalSuiteConfig)
    """GenEval (and shapes-GenEval's counts and sampler)."""
    shapes: ShapesSuiteConfig = field(default_factory=ShapesSuiteConfig)
    """Shapes-world data."""
    log: EvalLogConfig = field(default_factory=EvalLogConfig)
    """Logging."""

    def validate(self) -> None:
        if not self.ckpt:
            raise ConfigError("ckpt", "set the checkpoint directory (--ckpt DIR)")
        if self.threads < 0:
            raise ConfigError("threads", "must be >= 0")
        need = {"recon": [("recon.source", self.recon.source)], "mme": [("mme.path", self.mme.path)],
                "pope": [("pope.path", self.pope.path)],
                "shapes": [("shapes.shards", self.shapes.shards), ("shapes.geneval_prompts", self.shapes.geneval_prompts)]}
        for key, value in need.get(self.suite, []):
            if not value:
                raise ConfigError(key, f"suite {self.suite} needs it")
