"""A training checkpoint -> the standalone export the run would have written (``unimllm export``).

The checkpoint's ``meta.json`` says what it holds (its ``model_config``: a tokenizer for stage 1, a unified model
for stages 2-3); the model is rebuilt from that config, given the engine's weights, and written with the same
save code as the trainer's ``Task.export``: ``EvoTokenizer.save_pretrained`` (config.json + model.safetensors)
or ``UnifiedModel.save_pretrained`` (llm/, heads.safetensors, unified_config.json with the tokenizer's path and
sha256, text_tokenizer/). No DeepSpeed engine is launched.

Reading the weights:

- ZeRO 0-2 (and ZeRO-1/2 on any number of ranks): ``<engine>/state/mp_rank_00_model_states.pt`` holds the whole
  module in the training dtype; it is read with ``torch.load(weights_only=True)`` (no unpickling of code).
- ZeRO-3: parameters are partitioned across the ranks' optimizer files and are consolidated (to fp32) by
  DeepSpeed's ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``, which loads those files with
  ``torch.load(weights_only=False)``, i.e. **unpickles them: this can run arbitrary code from a malicious
  checkpoint**. It is only done when the caller passes ``allow_pickle=True`` (``--allow_pickle``), for
  checkpoints you trust.

Files the export needs besides the weights: the stage-1 tokenizer export (``tokenizer_dir``, else stage 3's
``tokenizer`` or the one its ``init_from`` export references, else ``model.tokenizer``; always checked against
the checkpoint's copy of its first L_pix codebooks), the text tokenizer (``text_tokenizer_dir``, else stage 3's
``init_from``'s, ``model.llm.text_tokenizer``, ``model.llm.pretrained`` or the run's ``text_tokenizer/``) and,
for pretrained LLMs / SigLIP towers, their directories' ``config.json`` (the architecture; their weights are not
read). Relative paths in the training config are relative to the directory training was launched from. Stage-3
LoRA adapters (``tune.lora`` in the config) are merged into the LLM, as stage 3's own export does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import sys
from pathlib import Path

import torch

from unimllm.checkpoint import UNREADABLE, unreadable_message
from unimllm.files import atomic_path
from unimllm.stages.artifacts import (
    MODEL_STATES,
    TOKENIZER,
    UNIFIED,
    ArtifactError,
    checkpoint_kind,
    engine_states_file,
    read_checkpoint_meta,
)


def engine_weights(states: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The module state dict of one DeepSpeed engine, from its model-states file (see the module docstring)."""
    if states.name == MODEL_STATES:
        try:
            sd = torch.load(states, map_location="cpu", weights_only=True)
        except UNREADABLE as e:  # truncated or corrupt: --allow_pickle would not help
            raise ArtifactError(unreadable_message(states, e)) from None
        except pickle.UnpicklingError as e:  # weights_only refused a pickled object: reported with the way out
            if not allow_pickle:
                raise ArtifactError(f"{states}: cannot be read with torch.load(weights_only=True) "
                                    f"({type(e).__name__}); pass --allow_pickle if you trust this checkpoint") from None
            sd = torch.load(states, map_location="cpu", weights_only=False)
        module = sd.get("module") if isinstance(sd, dict) else None
        if not module:
            raise ArtifactError(f"{states}: no 'module' weights in this DeepSpeed model-states file")
        return dict(module)
    if not allow_pickle:
        raise ArtifactError(f"{states.parent}: a ZeRO-3 checkpoint; consolidating it runs DeepSpeed's zero_to_fp32, "
                            "which unpickles the optimizer files (torch.load(weights_only=False)): pass --allow_pickle "
                            "if you trust this checkpoint")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # its progress report is not our output
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(states.parent.parent), tag=states.parent.name))


def _path_of(value: str | os.PathLike | None, key: str, ckpt: Path, what: str, flag: str) -> Path:
    if not value:
        raise ArtifactError(f"{ckpt}: the training config has no {key}; pass {flag} ({what})")
    return Path(value)


# ----------------------------------------------------------------------------- stage 1


def _standalone_towers(cfg):
    """The tokenizer config with pretrained towers replaced by their random-init description (only the pretrained
    directory's config.json is read), as ``EvoTokenizer.save_pretrained`` writes them."""
    from tokenizer.encoder import load_hf_config, tower_config_from_hf

    towers = {}
    for name in ("encoder", "teacher"):
        t = getattr(cfg, name)
        if t.pretrained:
            towers[name] = tower_config_from_hf(load_hf_config(t, f"model.{name}"), t.feature_layer, f"model.{name}")
    return dataclasses.replace(cfg, **towers)


def build_tokenizer(meta: dict, state: dict[str, torch.Tensor], ckpt: Path):
    """The EvoTokenizer of a stage-1 checkpoint with its engine's weights (dtypes as trained)."""
    from tokenizer.config import TokenizerConfig
    from tokenizer.model import EvoTokenizer, skip_weight_init
    from unimllm.config import from_dict

    cfg = _standalone_towers(from_dict(TokenizerConfig, meta["model_config"], source=str(ckpt / "meta.json")))
    with skip_weight_init():
        model = EvoTokenizer(cfg, with_teacher=any(k.startswith("teacher.") for k in state), config_key="model")
    _load(model, state, ckpt, assign=True)
    return model.eval()


def _load(model: torch.nn.Module, state: dict, ckpt: Path, *, assign: bool = False) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ArtifactError(f"{ckpt}: the engine's weights do not fit the model its meta.json describes "
                            f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    shared: dict[int, list[str]] = {}
    for k, v in own.items():  # tied weights (one tensor, several names) must arrive as one value
        shared.setdefault(v.untyped_storage().data_ptr(), []).append(k)
    for keys in shared.values():
        if len(keys) > 1 and any(not torch.equal(state[keys[0]], state[k]) for k in keys[1:]):
            raise ArtifactError(f"{ckpt}: {keys} are tied in the model but differ in the engine's weights")
    model.load_state_dict(state, strict=True, assign=assign)


# ----------------------------------------------------------------------------- stages 2-3


def _text_tokenizer(cfg, meta: dict, ckpt: Path, override: str | os.PathLike | None):
    """The text tokenizer the run trained with: stage 3's ``init_from`` export's, the configured one, the pretrained
    LLM's, or (tiny, random-init LLM) the one stage 2 trained into the run directory."""
    from llm.text_tokenizer import load_text_tokenizer

    if override:
        return load_text_tokenizer(override, "--text_tokenizer", cfg.llm.trust_remote_code)[0]
    hint = " (or pass --text_tokenizer)"
    if meta.get("init_from"):
        return load_text_tokenizer(Path(meta["init_from"]) / "text_tokenizer", f"{ckpt}: init_from's text tokenizer"
                                   + hint, cfg.llm.trust_remote_code)[0]
    if cfg.llm.text_tokenizer or cfg.llm.pretrained:
        key = "model.llm.text_tokenizer" if cfg.llm.text_tokenizer else "model.llm.pretrained"
        return load_text_tokenizer(cfg.llm.text_tokenizer or cfg.llm.pretrained, f"{ckpt}: {key}{hint}",
                                   cfg.llm.trust_remote_code)[0]
    run_tok = ckpt.parent.parent / "text_tokenizer"  # trained by stage 2 next to the run's checkpoints/
    return load_text_tokenizer(run_tok, f"{ckpt}: the run's text tokenizer{hint}")[0]


def _tokenizer(cfg, meta: dict, ckpt: Path, override: str | os.PathLike | None):
    """The stage-1 tokenizer export as an ``unimllm.stages.pipeline.ResolvedTokenizer`` (hashed once): the override, stage
    3's configured one or the one its ``init_from`` export references (sha256-checked against that record), else
    the model config's ``tokenizer``."""
    from tokenizer.model import is_tokenizer_dir
    from unimllm.stages.artifacts import ResolvedTokenizer, resolve_tokenizer, tokenizer_fingerprint

    if override:
        tdir, where = Path(override), "--tokenizer"
    elif (meta.get("config") or {}).get("tokenizer"):
        tdir, where = Path(meta["config"]["tokenizer"]), f"{ckpt}: tokenizer"
    elif meta.get("init_from"):
        return resolve_tokenizer(meta["init_from"], None, field="--tokenizer")
    else:
        tdir = _path_of(cfg.tokenizer, "model.tokenizer", ckpt, "the stage-1 tokenizer export", "--tokenizer")
        where = f"{ckpt}: model.tokenizer"
    if not is_tokenizer_dir(tdir):
        raise ArtifactError(f"{where}: {tdir} is not a stage-1 tokenizer export (config.json + model.safetensors); "
                            "pass --tokenizer DIR (relative config paths are read from the current directory)")
    return ResolvedTokenizer(tdir, tokenizer_fingerprint(tdir))


def _with_lora(llm, meta: dict, ckpt: Path):
    """The LLM wrapped in the peft LoRA adapters stage 3 trained (``tune.lora`` of its config), to load them."""
    from llm.lora import LoraConfig, add_lora
    from unimllm.config import from_dict

    lc = ((meta.get("config") or {}).get("tune") or {}).get("lora")
    if not lc:
        raise ArtifactError(f"{ckpt}: the weights hold LoRA adapters but meta.json's config has no tune.lora")
    return add_lora(llm, from_dict(LoraConfig, lc, source=f"{ckpt}/meta.json tune.lora"), field="tune.lora")


def _llm_skeleton(cfg, vocab: int, ckpt: Path):
    """The causal LM's architecture without reading pretrained weights (they come from the checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm.model import attn_implementation, build_llm
    from tokenizer.model import skip_weight_init

    path = Path(cfg.llm.pretrained)
    if cfg.llm.pretrained and not (path / "config.json").is_file():
        raise ArtifactError(f"{ckpt}: model.llm.pretrained {path} has no config.json (its architecture is needed; "
                            "run from the directory training was launched from)")
    with skip_weight_init():
        if not cfg.llm.pretrained:
            llm = build_llm(cfg.llm, vocab, device="cpu")
        else:
            hf = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.llm.trust_remote_code)
            llm = AutoModelForCausalLM.from_config(hf, attn_implementation=attn_implementation(cfg.llm, "cpu"),
                                                   trust_remote_code=cfg.llm.trust_remote_code)
    llm.tie_weights()  # skipping the init also skips tying the LM head to the embeddings
    return llm


def _check_tokenizer(tdir: Path, state: dict, depth_pix: int, ckpt: Path) -> None:
    """The checkpoint keeps a frozen copy of the tokenizer's first L_pix codebooks: they must be this tokenizer's."""
    from safetensors import safe_open

    with safe_open(str(tdir / "model.safetensors"), framework="pt") as f:
        codebook = f.get_tensor("quantizer.codebook")[:depth_pix]
    if codebook.shape != state["codebooks"].shape or not torch.equal(codebook.float(), state["codebooks"].float()):
        raise ArtifactError(f"{tdir}: is not the tokenizer {ckpt} was trained with (its codebooks differ from the "
                            "checkpoint's copy); pass the right one with --tokenizer")


def build_unified(meta: dict, state: dict[str, torch.Tensor], ckpt: Path, *, tokenizer_dir=None,
                  text_tokenizer_dir=None):
    """(UnifiedModel with the engine's weights, its text tokenizer, its tokenizer as a ResolvedTokenizer) of a
    stage-2/3 checkpoint."""
    from llm.config import UnifiedConfig
    from llm.model import Dims, UnifiedModel
    from llm.text_tokenizer import IM_END, IM_START, IMAGE_TOKEN
    from unimllm.config import from_dict

    cfg = from_dict(UnifiedConfig, meta["model_config"], source=str(ckpt / "meta.json"))
    if "dims" not in meta:
        raise ArtifactError(f"{ckpt / 'meta.json'}: no dims (sizes of the heads) recorded")
    dims = Dims(**meta["dims"])
    if "codebooks" not in state:
        raise ArtifactError(f"{ckpt}: the engine's weights have no codebooks buffer (not a unified model?)")
    tok = _tokenizer(cfg, meta, ckpt, tokenizer_dir)
    _check_tokenizer(tok.path, state, dims.depth_pix, ckpt)
    text_tok = _text_tokenizer(cfg, meta, ckpt, text_tokenizer_dir)
    for key, token in (("image", IMAGE_TOKEN), ("im_start", IM_START), ("im_end", IM_END)):
        got = text_tok.convert_tokens_to_ids(token)
        if got != dims.token_ids[key]:
            raise ArtifactError(f"{ckpt}: the text tokenizer's {token} id {got} is not the checkpoint's "
                                f"{dims.token_ids[key]}: another text tokenizer (--text_tokenizer)")
    lora = any(".lora_" in k for k in state)
    llm = _llm_skeleton(cfg, len(text_tok), ckpt)
    emb = llm.get_input_embeddings().weight
    name = next(n for n, p in llm.named_parameters() if p is emb)
    emb_key = next((k for k in state if k.startswith("llm.") and k.endswith("." + name)), None)  # peft: a prefix
    if emb_key is not None and state[emb_key].shape[0] != emb.shape[0]:
        llm.resize_token_embeddings(state[emb_key].shape[0], mean_resizing=False)
    model = UnifiedModel(cfg, _with_lora(llm, meta, ckpt) if lora else llm, dims)
    dtype = state[emb_key].dtype if emb_key is not None else torch.float32
    if dtype != torch.float32:
        model.to(dtype)  # as the engine held it (the codebooks stay float32)
    _load(model, state, ckpt)
    if lora:
        model.llm = model.llm.merge_and_unload()  # as stage 3's export: a plain LLM
    return model.eval(), text_tok, tok


# ----------------------------------------------------------------------------- entry


def export_checkpoint(ckpt: Path, out: Path, *, tokenizer_dir=None, text_tokenizer_dir=None,
                      allow_pickle: bool = False, overwrite: bool = False) -> tuple[str, Path]:
    """Write the standalone export of the training checkpoint ``ckpt`` to ``out`` (atomically: a sibling
    temporary directory renamed at the end, :func:`unimllm.files.atomic_path`). Returns (kind, out)."""
    meta = read_checkpoint_meta(ckpt)
    kind = checkpoint_kind(ckpt, meta)
    occupied = any(out.iterdir()) if out.is_dir() else out.exists()
    if occupied and not overwrite:
        raise ArtifactError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")
    state = engine_weights(engine_states_file(ckpt, kind), allow_pickle=allow_pickle)
    if out.exists() and not out.is_dir():
        out.unlink()  # --overwrite of a file
    with atomic_path(out) as tmp:
        if kind == TOKENIZER:
            build_tokenizer(meta, state, ckpt).save_pretrained(tmp)
        else:
            assert kind == UNIFIED
            model, text_tok, tok = build_unified(meta, state, ckpt, tokenizer_dir=tokenizer_dir,
                                                 text_tokenizer_dir=text_tokenizer_dir)
            ref = {"path": str(tok.path.resolve()), "sha256": tok.sha256}  # as artifacts.tokenizer_reference
            model.save_pretrained(tmp, tokenizer_ref=ref, text_tokenizer=text_tok)
    return kind, out
