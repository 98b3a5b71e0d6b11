"""Convert an official EvoTok checkpoint (``rq_train.py``'s ``{"model": state_dict, "args": ...}``) into an
``EvoTokenizer.save_pretrained`` directory.

Usage (from the repository root)::

    python -m tokenizer.convert --src iter-0500000.pt --out ckpt/evotok-base-256 --preset base-256 \
        --teacher /models/siglip2-large-patch16-256      # the teacher is not in official checkpoints
    python -m tokenizer.convert --src last.pt --out DIR --no_teacher   # for LLM use only

Key mapping (official -> ours):

    encoder_vqkd.[vision_model.]*         -> encoder.tower.model.*      (SigLIP encoder; 4.x/5.x HF layouts)
    encode_task_layer.{0,2}.*             -> encoder.pre_quant.{0,2}.*
    quantize.codebooks.i.weight[:-1]      -> quantizer.codebook[i]      (drops the padding row)
    quantize.codebooks.i.embed_ema        -> quantizer.embed_sum[i]
    quantize.codebooks.i.cluster_size_ema -> quantizer.cluster_size[i]
    quantize.codebooks.0.step             -> quantizer.step             (only saved with vq_warmup > 0)
    post_quant_conv.*                     -> pixel_decoder.post_quant_conv.*
    decoder.*                             -> pixel_decoder.*            (same internal names)
    decoder_vqkd.patch_embed.proj.*       -> semantic_decoder.patch_embed.*
    decoder_vqkd.{cls_token,pos_embed}    -> semantic_decoder.{cls_token,pos_embed}
    decoder_vqkd.blocks.i.attn.{q,v}_bias -> semantic_decoder.blocks.i.attn.qkv.bias = [q_bias, 0, v_bias]
    decoder_vqkd.blocks.i.*               -> semantic_decoder.blocks.i.*
    decoder_vqkd.fc_norm.*                -> semantic_decoder.norm.*
    decode_task_layer.{0,2}.*             -> semantic_decoder.head.{0,2}.*
    teacher_model.[vision_model.]*        -> teacher.model.*            (if present; else --teacher DIR)

Ignored: ``quantize.codebook_used`` (usage log), ``scaling_layer.*`` (identity on [-1, 1]),
``*.position_ids``. Our ``quantizer.seed`` / ``restarts_total`` have no official counterpart and keep their
fresh values. The report lists missing / unexpected / shape-mismatched keys; the directory is written only
when the report is clean (or with ``--allow_partial``). Exit status 1 when it is not clean.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenizer.config import TokenizerConfig, preset
from tokenizer.encoder import VisionTower
from unimllm.command_line import FlagParser

_QUANT = {"weight": "codebook", "embed_ema": "embed_sum", "cluster_size_ema": "cluster_size"}
_DEFAULTED = ("quantizer.seed", "quantizer.restarts_total", "quantizer.step")
_IGNORED = (r"quantize\.codebook_used", r"scaling_layer\..*", r".*\.position_ids", r"quantize\.codebooks\.\d+\.step")
_RULES = (  # (official regex, our key template); first match wins
    (r"encoder_vqkd\.(?:vision_model\.)?(.*)", r"encoder.tower.model.\1"),
    (r"teacher_model\.(?:vision_model\.)?(.*)", r"teacher.model.\1"),
    (r"encode_task_layer\.(\d+)\.(weight|bias)", r"encoder.pre_quant.\1.\2"),
    (r"post_quant_conv\.(.*)", r"pixel_decoder.post_quant_conv.\1"),
    (r"decoder\.(.*)", r"pixel_decoder.\1"),
    (r"decoder_vqkd\.patch_embed\.proj\.(.*)", r"semantic_decoder.patch_embed.\1"),
    (r"decoder_vqkd\.(cls_token|pos_embed)", r"semantic_decoder.\1"),
    (r"decoder_vqkd\.fc_norm\.(.*)", r"semantic_decoder.norm.\1"),
    (r"decoder_vqkd\.(blocks\.\d+\.(?:norm1|norm2|attn\.qkv\.weight|attn\.proj|mlp\.fc1|mlp\.fc2).*)",
     r"semantic_decoder.\1"),
    (r"decode_task_layer\.(\d+)\.(weight|bias)", r"semantic_decoder.head.\1.\2"),
)


@dataclass
class ConversionReport:
    """What a conversion matched; ``ok`` when nothing is missing, unexpected or mis-shaped."""

    mapped: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    config_mismatch: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch or self.config_mismatch)

    def format(self) -> str:
        lines = [f"mapped {self.mapped} tensors; " + ("OK" if self.ok else "PROBLEMS")]
        for name in ("missing", "unexpected", "shape_mismatch", "config_mismatch", "ignored", "defaulted"):
            items = getattr(self, name)
            lines.append(f"  {name} ({len(items)})" + (":" if items else ""))
            lines += [f"    {k}" for k in items[:50]] + ([f"    ... {len(items) - 50} more"] if len(items) > 50 else [])
        return "\n".join(lines)


def _strip(key: str) -> str:
    for p in ("module.", "_orig_mod."):
        while key.startswith(p):
            key = key[len(p):]
    return key


def map_official(sd: dict[str, torch.Tensor], depth: int) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Official state dict -> our key names (no shape checks yet); ``depth`` = our L_sem."""
    rep = ConversionReport()
    out: dict[str, torch.Tensor] = {}
    stages: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    qv_bias: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for raw, t in sd.items():
        k = _strip(raw)
        if m := re.fullmatch(r"quantize\.codebooks\.(\d+)\.(weight|embed_ema|cluster_size_ema)", k):
            i = int(m.group(1))
            if i >= depth:
                rep.unexpected.append(f"{raw} (stage {i} >= depth_sem {depth})")
            else:
                stages[_QUANT[m.group(2)]][i] = t[:-1] if m.group(2) == "weight" else t
            continue
        if k == "quantize.codebooks.0.step":  # every stage counts the same steps
            out["quantizer.step"] = t.reshape(()).long()
            continue
        if any(re.fullmatch(p, k) for p in _IGNORED):
            rep.ignored.append(raw)
            continue
        if m := re.fullmatch(r"decoder_vqkd\.(blocks\.\d+\.attn)\.(q|v)_bias", k):
            qv_bias[f"semantic_decoder.{m.group(1)}.qkv.bias"][m.group(2)] = t
            continue
        for pattern, template in _RULES:
            if re.fullmatch(pattern, k):
                out[re.sub(pattern, template, k)] = t
                break
        else:
            rep.unexpected.append(raw)
    for key, qv in qv_bias.items():
        if set(qv) == {"q", "v"}:
            out[key] = torch.cat([qv["q"], torch.zeros_like(qv["q"]), qv["v"]])
        else:
            rep.unexpected.append(f"{key} (only {sorted(qv)}_bias present)")
    for ours, per_stage in stages.items():
        absent = [i for i in range(depth) if i not in per_stage]
        if absent:
            rep.missing += [f"quantizer.{ours}[stage {i}]" for i in absent]
        else:
            out[f"quantizer.{ours}"] = torch.stack([per_stage[i] for i in range(depth)])
    return out, rep


def _check_args(args: object, cfg: TokenizerConfig) -> list[str]:
    """Compare the official run's argparse namespace with our config."""
    q = cfg.quantizer
    expect = {"codebook_size": q.codebook_size, "codebook_embed_dim": q.dim, "vqgan_depth": q.depth_pix,
              "vqkd_depth": q.depth_sem}
    got = vars(args) if hasattr(args, "__dict__") else dict(args) if isinstance(args, dict) else {}
    return [f"{k}: official {got[k]!r} vs ours {v!r}" for k, v in expect.items() if k in got and got[k] != v]


def load_official(path: str | Path, *, use_ema: bool = False, trust_pickle: bool = False) -> tuple[dict, object]:
    """(state dict, args) from an official checkpoint; ``weights_only`` loading unless ``trust_pickle``."""
    import argparse as _argparse

    if trust_pickle:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    else:
        with torch.serialization.safe_globals([_argparse.Namespace]):
            try:
                ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - re-raised with advice
                raise RuntimeError(f"{path}: weights_only load failed ({e}); if you trust the file, pass "
                                   "--trust_pickle") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    key = "ema" if use_ema else "model"
    if key in ckpt:
        return ckpt[key], ckpt.get("args")
    if use_ema:
        raise KeyError(f"{path}: no 'ema' entry (the release trains without EMA)")
    return ckpt, None  # a bare state dict


def convert(sd: dict[str, torch.Tensor], cfg: TokenizerConfig, *, args: object = None, teacher_dir: str = "",
            with_teacher: bool = True):
    """Build ``EvoTokenizer(cfg)`` and fill it from an official state dict; returns (model, report). The
    model holds the converted weights only where the report has no problem."""
    from tokenizer.model import EvoTokenizer

    model = EvoTokenizer(cfg, with_teacher=with_teacher)
    own = model.state_dict()
    mapped, rep = map_official(sd, cfg.quantizer.depth_sem)
    if args is not None:
        rep.config_mismatch += _check_args(args, cfg)
    if teacher_dir and with_teacher:
        if any(k.startswith("teacher.") for k in mapped):
            rep.config_mismatch.append("teacher weights both in the checkpoint and from --teacher")
        tower = VisionTower(dataclasses.replace(cfg.teacher, pretrained=teacher_dir), config_key="--teacher")
        mapped.update({f"teacher.model.{k}": v for k, v in tower.model.state_dict().items()
                       if not k.endswith("position_ids")})
    for k in sorted(mapped):
        if k.startswith("teacher.") and not with_teacher:
            rep.ignored.append(f"{k} (--no_teacher)")
            del mapped[k]
        elif k not in own:
            rep.unexpected.append(f"{k} (mapped, not in our model)")
            del mapped[k]
        elif mapped[k].shape != own[k].shape:
            rep.shape_mismatch.append(f"{k}: official {tuple(mapped[k].shape)} vs ours {tuple(own[k].shape)}")
            del mapped[k]
    rep.defaulted = [k for k in _DEFAULTED if k in own and k not in mapped]
    rep.missing += [k for k in own if k not in mapped and k not in _DEFAULTED]
    rep.mapped = len(mapped)
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v.to(own[k].dtype))
    return model, rep


def main(argv: list[str] | None = None) -> int:
    ap = FlagParser(prog="python -m tokenizer.convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="official checkpoint (.pt)")
    ap.add_argument("--out", required=True, help="output directory (EvoTokenizer.save_pretrained)")
    ap.add_argument("--preset", default="base-256", help="tokenizer preset (tiny, base-256)")
    ap.add_argument("--teacher", default="", help="local SigLIP directory for the frozen teacher")
    ap.add_argument("--no_teacher", action="store_true", help="save without a teacher (LLM use only)")
    ap.add_argument("--ema", action="store_true", help="convert the checkpoint's 'ema' weights")
    ap.add_argument("--trust_pickle", action="store_true", help="torch.load with weights_only=False")
    ap.add_argument("--allow_partial", action="store_true", help="write the directory despite problems")
    a = ap.parse_args(argv)
    cfg = preset(a.preset)
    sd, args = load_official(a.src, use_ema=a.ema, trust_pickle=a.trust_pickle)
    model, rep = convert(sd, cfg, args=args, teacher_dir=a.teacher, with_teacher=not a.no_teacher)
    print(f"{a.src} -> {a.out} (preset {a.preset})\n{rep.format()}")
    if rep.ok or a.allow_partial:
        model.save_pretrained(a.out)
        print(f"wrote {a.out}")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
