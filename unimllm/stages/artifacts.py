"""What a directory holds, for the ``unimllm`` command line: a tokenizer export, a unified export, a training
checkpoint or a run directory, and its description (``unimllm info``).

    tokenizer   stage-1 export: config.json (with a ``quantizer`` section) + model.safetensors
    unified     stage-2/3 export: unified_config.json, heads.safetensors, llm/, text_tokenizer/
    checkpoint  <run>/checkpoints/step_XXXXXXXX/: meta.json, <engine>/state/ (DeepSpeed), rank_*.pt
    run         a run directory: checkpoints/ and/or export/{tokenizer,unified}/

Paths that are not what a command expects raise :class:`ArtifactError`, one line naming the path and what was
expected. Nothing here unpickles: safetensors headers give shapes, and DeepSpeed's model-states files are opened
with ``torch.load(weights_only=True, mmap=True)`` (shapes and versions only; no tensor data is read).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unimllm.checkpoint import ENGINE_TAG, META, latest_checkpoint, list_checkpoints
from unimllm.errors import ArtifactError
from unimllm.files import tensors_fingerprint

TOKENIZER, UNIFIED, CHECKPOINT, RUN = "tokenizer", "unified", "checkpoint", "run"
EXPECTED = {
    TOKENIZER: "a stage-1 tokenizer export (config.json + model.safetensors)",
    UNIFIED: "a unified export (unified_config.json, heads.safetensors, llm/, text_tokenizer/)",
    CHECKPOINT: "a training checkpoint (checkpoints/step_XXXXXXXX/ with meta.json)",
    RUN: "a run directory (checkpoints/ or export/)",
}
ENGINE = {TOKENIZER: "tokenizer", UNIFIED: "unified"}  # checkpoint kind -> the DeepSpeed engine that holds it
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2: the whole module
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3: partitioned placeholders


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """The fingerprint (:func:`unimllm.files.tensors_fingerprint`) of a tokenizer export's ``model.safetensors``:
    it identifies the weights that made a set of codes, whatever the file's header layout."""
    return tensors_fingerprint(Path(tokenizer_dir) / "model.safetensors")


def tokenizer_reference(tokenizer_dir: str | Path) -> dict:
    return {"path": str(Path(tokenizer_dir).resolve()), "sha256": tokenizer_fingerprint(tokenizer_dir)}


@dataclass(frozen=True)
class ResolvedTokenizer:
    """The EvoTok tokenizer of a unified export, checked against the export's reference (see resolve_tokenizer)."""

    path: Path
    """Its directory (``config.json`` + ``model.safetensors``)."""
    sha256: str
    """sha256 of its ``model.safetensors`` tensors (tokenizer_fingerprint), equal to the one the export records."""


def resolve_tokenizer(export_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
                      field: str = "tokenizer_dir") -> ResolvedTokenizer:
    """The tokenizer the unified export ``export_dir`` was trained with: ``tokenizer_dir`` when given (the
    export's reference moved), else the path the export references. Refused unless it is an EvoTok export
    whose ``model.safetensors`` has the recorded sha256 (hashed once, here). Errors name ``field`` (the
    argument or config key that overrides the tokenizer)."""
    from llm.model import read_meta
    from tokenizer.model import is_tokenizer_dir

    src = Path(export_dir)
    ref = read_meta(src)["tokenizer"]  # FileNotFoundError / ValueError when src is not a unified export
    tdir = Path(tokenizer_dir or ref["path"])
    if not is_tokenizer_dir(tdir):
        if tokenizer_dir:
            raise FileNotFoundError(f"{field}: {tdir} is not an EvoTok export (config.json + model.safetensors)")
        raise FileNotFoundError(f"{src}: its tokenizer {tdir} is missing or not an EvoTok export (config.json + "
                                f"model.safetensors); pass {field} if it moved")
    sha = tokenizer_fingerprint(tdir)
    if sha != ref["sha256"]:
        raise ValueError(f"{field}: {tdir} is not the tokenizer {src} was trained with "
                         f"(sha256 {sha[:12]}... != {ref['sha256'][:12]}...)")
    return ResolvedTokenizer(tdir, sha)


@dataclass(frozen=True)
class Artifact:
    kind: str
    """tokenizer, unified, checkpoint or run."""
    path: Path


def identify(path: str | Path) -> Artifact:
    """What ``path`` is (see the module docstring); ArtifactError when it is none of them."""
    from tokenizer.model import is_tokenizer_dir

    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p}: does not exist")
    if not p.is_dir():
        raise ArtifactError(f"{p}: is a file; expected a directory: {EXPECTED[TOKENIZER]}, {EXPECTED[UNIFIED]}, "
                            f"{EXPECTED[CHECKPOINT]} or {EXPECTED[RUN]}")
    if is_tokenizer_dir(p):
        return Artifact(TOKENIZER, p)
    if (p / "unified_config.json").is_file():
        return Artifact(UNIFIED, p)
    if (p / META).is_file():
        return Artifact(CHECKPOINT, p)
    if (p / "checkpoints").is_dir() or (p / "export").is_dir():
        return Artifact(RUN, p)
    raise ArtifactError(f"{p}: is not {EXPECTED[TOKENIZER]}, {EXPECTED[UNIFIED]}, {EXPECTED[CHECKPOINT]} or "
                        f"{EXPECTED[RUN]}")


def _wrong_kind(a: Artifact, command: str, wanted: str) -> ArtifactError:
    if a.kind == RUN:
        found = [f"export/{p.name}" for p in sorted((a.path / "export").glob("*")) if p.is_dir()]
        return ArtifactError(f"{a.path}: is a run directory with {', '.join(found) or 'no export'}; {command} needs "
                             f"{wanted} (`unimllm export` writes one from a training checkpoint)")
    hint = "; export it first with `unimllm export`" if a.kind == CHECKPOINT else ""
    return ArtifactError(f"{a.path}: is {EXPECTED[a.kind]}; {command} needs {wanted}{hint}")


def export_of(path: str | Path, command: str, kinds: tuple[str, ...] = (UNIFIED,)) -> Artifact:
    """The export ``path`` names, of one of ``kinds`` (in order of preference): ``path`` itself, or a run
    directory's ``export/tokenizer`` / ``export/unified``. ArtifactError naming ``command`` otherwise."""
    if not Path(path).exists():
        raise ArtifactError(f"{command}: {path} does not exist")
    a = identify(path)
    if a.kind == RUN:
        for kind in kinds:
            cand = a.path / "export" / ENGINE[kind]
            if cand.is_dir():
                a = identify(cand)
                break
    if a.kind not in kinds:
        wanted = " or ".join(EXPECTED[k] for k in kinds)
        raise _wrong_kind(a, command, f"{wanted} or a run directory holding export/")
    return a


def unified_export(path: str | Path, command: str) -> Path:
    """A complete unified export: ``path`` itself or a run directory's ``export/unified``."""
    from llm.model import read_meta

    a = export_of(path, command, (UNIFIED,))
    read_meta(a.path)  # ValueError naming the file when it is another format
    missing = [f for f in ("heads.safetensors", "llm/config.json", "text_tokenizer") if not (a.path / f).exists()]
    if missing:
        raise ArtifactError(f"{a.path}: incomplete unified export (missing {', '.join(missing)}); {command} needs "
                            "a complete one")
    return a.path


def tokenizer_export(path: str | Path, command: str, *, field: str = "--tokenizer") -> ResolvedTokenizer:
    """The tokenizer of ``path``: a tokenizer export, a run directory's ``export/tokenizer``, or the tokenizer a
    unified export (or a run's ``export/unified``) references (sha256-checked; errors name ``field``)."""
    a = export_of(path, command, (TOKENIZER, UNIFIED))
    if a.kind == UNIFIED:
        return resolve_tokenizer(unified_export(a.path, command), None, field=field)
    return ResolvedTokenizer(a.path, tokenizer_fingerprint(a.path))


def training_checkpoint(path: str | Path, command: str) -> Path:
    """A complete training checkpoint: ``path`` itself or a run directory's latest one."""
    a = identify(path)
    if a.kind == RUN:
        latest = latest_checkpoint(a.path / "checkpoints")
        if latest is None:
            raise ArtifactError(f"{a.path}: run directory without a complete checkpoint (checkpoints/step_*/meta.json)")
        return latest
    if a.kind != CHECKPOINT:
        raise _wrong_kind(a, command, f"{EXPECTED[CHECKPOINT]} or a run directory")
    return a.path


def read_checkpoint_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / META).read_text())
    except ValueError as e:
        raise ArtifactError(f"{ckpt / META}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise ArtifactError(f"{ckpt / META}: not a unimllm checkpoint meta.json (no step)")
    return meta


def checkpoint_kind(ckpt: Path, meta: dict) -> str:
    """tokenizer (stage 1) or unified (stages 2-3), from the model config recorded in meta.json."""
    model = meta.get("model_config") or {}
    if "quantizer" in model:
        return TOKENIZER
    if "llm" in model:
        return UNIFIED
    raise ArtifactError(f"{ckpt / META}: records neither a tokenizer nor a unified model config (model_config); "
                        f"stage {meta.get('stage')!r} is not exportable")


def engine_states_file(ckpt: Path, kind: str) -> Path:
    """The DeepSpeed model-states file of the checkpoint's engine (``<engine>/<tag>/*model_states.pt``)."""
    engine = ckpt / ENGINE[kind]
    latest = engine / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ENGINE_TAG
    for name in (MODEL_STATES, ZERO3_MODEL_STATES):
        if (engine / tag / name).is_file():
            return engine / tag / name
    raise ArtifactError(f"{engine / tag}: no {MODEL_STATES} or {ZERO3_MODEL_STATES} (an incomplete checkpoint?)")


# ----------------------------------------------------------------------------- description


def _prod(shape) -> int:
    return math.prod(int(s) for s in shape)


def _safetensors_shapes(path: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _by_part(shapes: dict[str, tuple], prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for k, shape in shapes.items():
        out[prefix + k.split(".")[0]] += _prod(shape)
    return dict(out)


def _disk(path: Path) -> dict:
    def size(p: Path) -> int:
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    entries = {p.name: size(p) for p in sorted(path.iterdir())}
    return {"total_bytes": sum(entries.values()), "entries": entries}


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds") if t else None


def _tokenizer_summary(cfg: dict) -> dict:
    q, e = cfg["quantizer"], cfg["encoder"]
    return {"image_size": e["image_size"], "grid": e["image_size"] // e["patch_size"], "depth_sem": q["depth_sem"],
            "depth_pix": q["depth_pix"], "codebook_size": q["codebook_size"], "code_dim": q["dim"],
            "encoder": {k: e[k] for k in ("pretrained", "hidden_size", "num_layers", "patch_size")}}


def _unified_summary(model: dict, dims: dict) -> dict:
    llm = model["llm"]
    return {"llm": {k: llm[k] for k in ("pretrained", "arch", "hidden_size", "num_layers")} if not llm["pretrained"]
            else {"pretrained": llm["pretrained"]},
            "depth_transformer": model["depth"], "freeze_llm": model["freeze_llm"], "sampler": model["sampler"],
            "image": {k: dims[k] for k in ("grid", "depth_pix", "codebook_size", "code_dim", "sem_dim")}}


def _run_provenance(export_dir: Path) -> dict | None:
    """Step and time of the run an export was written by (``<run>/export/<name>``), from its latest checkpoint."""
    parent = export_dir.resolve().parent
    if parent.name != "export":
        return None
    latest = latest_checkpoint(parent.parent / "checkpoints")
    if latest is None:
        return {"run": str(parent.parent)}
    meta = json.loads((latest / META).read_text())
    return {"run": str(parent.parent), "checkpoint": str(latest), "step": meta.get("step"),
            "time": _iso(meta.get("time")), "torch": meta.get("torch")}


def describe_tokenizer(path: Path) -> dict:

    cfg = json.loads((path / "config.json").read_text())
    parts = _by_part(_safetensors_shapes(path / "model.safetensors"))
    return {"kind": "tokenizer export", "path": str(path.resolve()), "config": _tokenizer_summary(cfg),
            "parameters": {**parts, "total": sum(parts.values())}, "disk": _disk(path),
            "sha256": tokenizer_fingerprint(path), "provenance": _run_provenance(path)}


def describe_unified(path: Path) -> dict:
    from llm.model import read_meta
    from tokenizer.model import is_tokenizer_dir

    meta = read_meta(path)
    llm_files = sorted((path / "llm").glob("*.safetensors"))
    llm = sum(_prod(s) for f in llm_files for s in _safetensors_shapes(f).values())
    parts = {"llm": llm, **_by_part(_safetensors_shapes(path / "heads.safetensors"))}
    ref = meta["tokenizer"]
    found = is_tokenizer_dir(ref["path"])
    tok = {"path": ref["path"], "sha256": ref["sha256"], "found": found,
           "matches": tokenizer_fingerprint(ref["path"]) == ref["sha256"] if found else None}
    hf = json.loads((path / "llm" / "config.json").read_text()) if (path / "llm" / "config.json").is_file() else {}
    config = _unified_summary(meta["model"], meta["dims"])
    config["llm"].update({k: hf[k] for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
                          if k in hf})
    return {"kind": "unified export", "path": str(path.resolve()), "config": config,
            "parameters": {**parts, "total": sum(parts.values())}, "disk": _disk(path), "tokenizer": tok,
            "provenance": _run_provenance(path)}


def _engine_info(states: Path) -> dict:
    """Parameter counts per part and the DeepSpeed version from a model-states file, without reading tensor
    data (weights_only + mmap). ZeRO-3 files hold placeholders; their ``param_shapes`` give the sizes."""
    import torch

    try:
        sd = torch.load(states, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - reported, not fatal for a description
        return {"states": str(states), "unreadable": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    shapes: dict[str, tuple] = {}
    for group in [*(sd.get("param_shapes") or []), sd.get("frozen_param_shapes") or {}]:
        shapes.update({k: tuple(v) for k, v in group.items()})
    seen = set()
    for k, v in (sd.get("module") or {}).items():
        if k in shapes or not hasattr(v, "shape") or v.numel() == 0:
            continue
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ident in seen:  # tied weights (e.g. LM head = embeddings) count once
            continue
        seen.add(ident)
        shapes[k] = tuple(v.shape)
    parts = _by_part(shapes)
    return {"states": str(states), "deepspeed": sd.get("ds_version"), "global_steps": sd.get("global_steps"),
            "parameters": {**parts, "total": sum(parts.values())}}


def _data_provenance(config: dict) -> list[dict]:
    """Each training source's shard pattern, and the tokenizer sha256 its codes manifest records (if any)."""
    from data.loader import expand_shards
    from unimllm.stages.precompute_codes import read_codes_manifest

    out = []
    for src in (config.get("data") or {}).get("sources") or []:
        entry = {"shards": src.get("shards"), "weight": src.get("weight")}
        try:
            first = expand_shards(src.get("shards") or "")[:1]
            manifest = read_codes_manifest(first[0]) if first else None
        except (OSError, ValueError):
            manifest = None
        if manifest:
            entry["codes_tokenizer_sha256"] = manifest.get("tokenizer_sha256")
        out.append(entry)
    return out


def describe_checkpoint(ckpt: Path) -> dict:
    from tokenizer.model import is_tokenizer_dir

    meta = read_checkpoint_meta(ckpt)
    kind = checkpoint_kind(ckpt, meta)
    config, model = meta.get("config") or {}, meta["model_config"]
    train = config.get("train") or {}
    out: dict[str, Any] = {
        "kind": f"training checkpoint ({kind})", "path": str(ckpt.resolve()), "exports_to": kind,
        "config": _tokenizer_summary(model) if kind == TOKENIZER else _unified_summary(model, meta.get("dims") or {}),
        "training": {"stage": meta.get("stage"), "step": meta["step"], "steps": train.get("steps"),
                     "time": _iso(meta.get("time")), "world_size": meta.get("world_size"),
                     "zero_stage": train.get("zero_stage"), "precision": train.get("precision"),
                     "seed": train.get("seed"), "torch": meta.get("torch"), "data": _data_provenance(config)},
    }
    info = _engine_info(engine_states_file(ckpt, kind))
    out["training"]["deepspeed"] = info.pop("deepspeed", None)
    out["parameters"] = info.pop("parameters", None)
    out["engine"] = info
    if meta.get("init_from"):  # stage 3: the stage-2 export it started from records the tokenizer's sha256
        out["training"]["init_from"] = meta["init_from"]
        if (Path(meta["init_from"]) / "unified_config.json").is_file():
            ref = json.loads((Path(meta["init_from"]) / "unified_config.json").read_text()).get("tokenizer") or {}
            found = is_tokenizer_dir(ref.get("path", ""))
            out["tokenizer"] = {**ref, "recorded_by": meta["init_from"], "found": found,
                                "matches": tokenizer_fingerprint(ref["path"]) == ref.get("sha256") if found else None}
    if kind == UNIFIED and "tokenizer" not in out and model.get("tokenizer"):
        tdir = Path(model["tokenizer"])
        found = is_tokenizer_dir(tdir)
        out["tokenizer"] = {"path": str(tdir), "found": found,
                            "sha256_now": tokenizer_fingerprint(tdir) if found else None,
                            "note": "stage-2 checkpoints do not record the tokenizer's sha256; `unimllm export` "
                                    "checks it against the checkpoint's codebooks"}
    out["disk"] = _disk(ckpt)
    return out


def describe(path: str | Path) -> dict:
    """``unimllm info``: kind, config summary, parameters per part, sizes on disk, provenance."""
    a = identify(path)
    if a.kind == TOKENIZER:
        return describe_tokenizer(a.path)
    if a.kind == UNIFIED:
        unified_export(a.path, "info")  # complete and of our format
        return describe_unified(a.path)
    if a.kind == CHECKPOINT:
        return describe_checkpoint(a.path)
    steps = [s for s, _ in list_checkpoints(a.path / "checkpoints")]
    exports = {name: str(a.path / "export" / name) for name in ("tokenizer", "unified")
               if (a.path / "export" / name).is_dir()}
    latest = latest_checkpoint(a.path / "checkpoints")
    return {"kind": "run", "path": str(a.path.resolve()), "checkpoints": steps, "exports": exports,
            "latest_checkpoint": describe_checkpoint(latest) if latest else None}
