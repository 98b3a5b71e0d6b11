"""The unified model: one Hugging Face causal LM that reads images (understanding) and writes them (generation).

Understanding: semantic-decoder features (B, N, C) -> ``und_projector`` (2-layer GELU MLP) -> spliced into
the embeddings at the ``<image>`` slots of a user turn.
Generation: at the slots of ``<im_start> ... <im_end>`` the input is ``gen_projector(sum_d e_d(k_d))`` of that
position's L_pix codes; the LLM's hidden state at the slot before predicts them through the depth
transformer. Loss = text_weight * text CE (assistant tokens) + image_weight * code CE (positions x depths).

The frozen tokenizer stays outside this module (so ZeRO never partitions it); its first L_pix codebooks are
copied in as a buffer because both projector input and depth-transformer input are code vectors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.config import LLMConfig, UnifiedConfig
from llm.conversation import GEN, IGNORE, UND
from llm.depth import DepthTransformer
from llm.text_tokenizer import IM_END, IM_START, IMAGE_SPECIALS, IMAGE_TOKEN
from unimllm.config import from_dict, to_dict
from unimllm.files import atomic_path

CONFIG_NAME, HEADS_NAME, LLM_DIR, TEXT_TOKENIZER_DIR = "unified_config.json", "heads.safetensors", "llm", "text_tokenizer"
FORMAT = "unimllm-unified-v1"


class Projector(nn.Module):
    """LLaVA ``mlp2x_gelu``: Linear(in -> hidden) -> GELU -> Linear(hidden -> out)."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def attn_implementation(cfg: LLMConfig, device: torch.device | str | None = None) -> str:
    """``auto``: flash_attention_2 when the package is installed and we run on CUDA, else SDPA."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def build_llm(cfg: LLMConfig, vocab_size: int, *, field: str = "model.llm", dtype: torch.dtype | None = None,
              device: torch.device | str | None = None):
    """A local pretrained causal LM, or a random-init one of ``cfg.arch`` with ``vocab_size`` rows."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    attn = attn_implementation(cfg, device)
    if cfg.pretrained:
        path = Path(cfg.pretrained)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{field}.pretrained: {path} is not a local Hugging Face model directory "
                                    "(no config.json); download it first, nothing is fetched at run time")
        return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn, dtype=dtype,
                                                    trust_remote_code=cfg.trust_remote_code)
    kw = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
              tie_word_embeddings=True)
    hf_cfg = Qwen2Config(**kw) if cfg.arch == "qwen2" else LlamaConfig(**kw)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)
    return model.to(dtype) if dtype is not None else model


@dataclasses.dataclass
class Dims:
    """Sizes the heads are built with (from the tokenizer and the text tokenizer)."""

    sem_dim: int
    """Semantic-decoder feature width C."""
    code_dim: int
    """Code vector width D."""
    depth_pix: int
    """L_pix: codes generated per position."""
    codebook_size: int
    """K."""
    grid: int
    """Image positions per side (N = grid**2)."""
    token_ids: dict
    """``<image>``, ``<im_start>``, ``<im_end>``, pad and eos ids."""
    new_token_ids: list
    """Rows of the embedding that train with a frozen LLM (the image special tokens)."""


class UnifiedModel(nn.Module):
    """Pure nn.Module: ``llm`` (HF causal LM), ``und_projector``, ``gen_projector``, ``depth``, ``codebooks``."""

    def __init__(self, cfg: UnifiedConfig, llm: nn.Module, dims: Dims):
        super().__init__()
        self.cfg, self.dims, self.llm = cfg, dims, llm
        H = llm.config.hidden_size
        hid = cfg.projector_hidden or H
        self.und_projector = Projector(dims.sem_dim, hid, H)
        self.gen_projector = Projector(dims.code_dim, hid, H)
        self.depth = DepthTransformer(cfg.depth, H, dims.code_dim, dims.depth_pix, dims.codebook_size)
        self.register_buffer("codebooks", torch.zeros(dims.depth_pix, dims.codebook_size, dims.code_dim))  # (L, K, D)
        self.gen_pos = nn.Parameter(torch.zeros(dims.grid ** 2, H)) if cfg.image_pos_embed else None  # (N, H)
        self.und_pos = nn.Parameter(torch.zeros(dims.grid ** 2, H)) if cfg.und_pos_embed else None  # (N, H)
        if cfg.input_norm:  # per-channel (mean, std) of the projector inputs; identity until set_input_stats
            self.register_buffer("und_stats", torch.stack([torch.zeros(dims.sem_dim), torch.ones(dims.sem_dim)]))
            self.register_buffer("gen_stats", torch.stack([torch.zeros(dims.code_dim), torch.ones(dims.code_dim)]))
        self._row_mask_hooks: list = []

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply; dtype casts (bf16 engines) leave the codebooks float32, as the tokenizer's."""
        keep = self.codebooks
        super()._apply(fn, recurse)
        if self.codebooks.dtype != keep.dtype:
            self.codebooks = keep.to(device=self.codebooks.device)
        return self

    @property
    def image_positions(self) -> int:
        return self.dims.grid ** 2

    # ------------------------------------------------------------------ trainable parts
    def configure_trainable(self) -> list[dict]:
        """Freeze per config; returns optimizer param groups (embedding rows: no weight decay)."""
        for h in self._row_mask_hooks:
            h.remove()
        self._row_mask_hooks = []
        heads = [p for n, p in self.named_parameters() if not n.startswith("llm.")]
        for p in heads:
            p.requires_grad_(True)
        if not self.cfg.freeze_llm:
            self.llm.requires_grad_(True)
            return [{"params": heads}, {"params": [p for p in self.llm.parameters()]}]
        self.llm.requires_grad_(False)
        rows = torch.tensor(self.dims.new_token_ids, dtype=torch.long)
        emb = {id(p): p for p in (self.llm.get_input_embeddings().weight, self.llm.get_output_embeddings().weight)}
        for p in emb.values():  # only the new tokens' rows learn: a gradient mask on the shared matrix
            p.requires_grad_(True)
            mask = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)
            mask[rows] = 1
            self._row_mask_hooks.append(p.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
        return [{"params": heads}, {"params": list(emb.values()), "weight_decay": 0.0}]

    def enable_gradient_checkpointing(self) -> None:
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.llm.config.use_cache = False

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def set_input_stats(self, und_feats: Tensor, gen_codes: Tensor) -> None:
        """Measure the projector-input statistics (``input_norm``) on data: und_feats (n, N, C) semantic
        features, gen_codes (n, N, L_pix). Every rank must pass the same data."""
        for name, x in (("und_stats", und_feats.float()), ("gen_stats", self.code_vectors(gen_codes).sum(-2))):
            x = x.flatten(0, -2)  # (rows, channels)
            getattr(self, name).copy_(torch.stack([x.mean(0), x.std(0).clamp(min=1e-6)]))

    def _standardize(self, x: Tensor, name: str) -> Tensor:
        if not self.cfg.input_norm:
            return x
        stats = getattr(self, name).to(x.dtype)
        return (x - stats[0]) / stats[1]

    def und_inputs(self, feats: Tensor) -> Tensor:
        """Semantic-decoder features (..., N, C) -> LLM inputs (..., N, H) of understanding slots (plus each
        slot's grid-position embedding when configured)."""
        w = self.und_projector.net[0].weight
        x = self.und_projector(self._standardize(feats.to(w.dtype), "und_stats"))
        return x if self.und_pos is None else x + self.und_pos.to(x.dtype)

    def code_vectors(self, codes: Tensor) -> Tensor:
        """codes (..., L) -> per-depth code vectors (..., L, D) from the frozen codebooks (float32)."""
        return torch.stack([self.codebooks[d][codes[..., d]] for d in range(codes.shape[-1])], -2)

    def gen_inputs(self, codes: Tensor, position: int | None = None) -> Tensor:
        """LLM inputs (..., H) of generation slots: gen_projector of the summed code vectors, plus the slot's
        grid-position embedding when configured. codes (..., N, L_pix) covers whole images; with
        ``position`` set, codes (M, L_pix) are the codes of that one grid position."""
        f = self.code_vectors(codes).sum(-2)  # (..., D)
        x = self.gen_projector(self._standardize(f.to(self.gen_projector.net[0].weight.dtype), "gen_stats"))
        if self.gen_pos is None:
            return x
        return x + (self.gen_pos if position is None else self.gen_pos[position]).to(x.dtype)

    def embed(self, input_ids: Tensor, kind: Tensor, und_feats: Tensor | None = None,
              gen_codes: Tensor | None = None) -> Tensor:
        """Token embeddings (B, T, H) with UND slots <- und_projector(und_feats (n_u, N, C)) and GEN slots
        <- gen_inputs(gen_codes (n_g, N, L)), both in row-major slot order."""
        emb = self.llm.get_input_embeddings()(input_ids)  # (B, T, H)
        # Empty (0, N, ...) inputs still run the projector: under ZeRO-3 every rank must call the same modules.
        if und_feats is not None:
            x = self.und_inputs(und_feats).reshape(-1, emb.shape[-1])  # (n_u * N, H)
            emb = emb.masked_scatter((kind == UND).unsqueeze(-1), x.to(emb.dtype))
        if gen_codes is not None:
            x = self.gen_inputs(gen_codes).reshape(-1, emb.shape[-1])  # (n_g * N, H)
            emb = emb.masked_scatter((kind == GEN).unsqueeze(-1), x.to(emb.dtype))
        return emb

    def hidden_states(self, inputs_embeds: Tensor, attention_mask: Tensor, **kw):
        """The LLM body (no LM head): BaseModelOutputWithPast with last_hidden_state (B, T, H)."""
        return self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kw)

    def block_mask(self, attention_mask: Tensor, block: Tensor | None, dtype: torch.dtype,
                   segment: Tensor | None = None) -> Tensor:
        """(B, T) padding mask, turn blocks (``ConversationEncoder.encode_blocks``) and packed samples
        (``segment``, llm.batch.pack_sequences) -> the 4D mask the LLM takes as is, (B, 1, T, T): causal, real keys
        only, a key of block k > 0 seen only from block k, a key seen only from its own sample.
        Boolean for sdpa, additive for eager; flash-attention takes no such mask."""
        impl = self.llm.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"turn blocks (mix.independent_turns) and packed samples (mix.pack) need sdpa or eager "
                             f"attention, not {impl!r} (model.llm.attn_implementation)")
        ref = block if block is not None else segment
        T = ref.shape[1]
        eye = torch.eye(T, dtype=torch.bool, device=ref.device)
        if block is not None:
            seen = (block[:, None, :] == 0) | (block[:, None, :] == block[:, :, None])  # (B, Tq, Tk): prefix or own
        else:
            seen = torch.ones(ref.shape[0], T, T, dtype=torch.bool, device=ref.device)
        if segment is not None:
            seen = seen & (segment[:, None, :] == segment[:, :, None])  # (B, Tq, Tk): own sample only
        keep = seen & torch.ones_like(eye).tril() & attention_mask.bool()[:, None, :]  # causal, real keys
        keep = keep | eye  # padded queries see themselves (no empty softmax rows)
        if impl == "sdpa":
            return keep[:, None]
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)[:, None]

    def depth_logits(self, h: Tensor, codes: Tensor) -> Tensor:
        """Teacher forcing: h (M, H) the states before M generation slots, codes (M, L) -> logits (M, L, K)."""
        cum = self.code_vectors(codes).cumsum(-2)[:, :-1]  # (M, L-1, D): e1, e1+e2, ...
        return self.depth(h, cum.to(h.dtype))

    # ------------------------------------------------------------------ training forward
    def forward(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor, kind: Tensor,
                und_feats: Tensor | None = None, gen_codes: Tensor | None = None, block: Tensor | None = None,
                position_ids: Tensor | None = None, segment: Tensor | None = None) -> dict[str, Tensor]:
        """One batch (see llm.conversation): input_ids/targets/kind/attention_mask (B, T); und_feats
        (n_u, N, C); gen_codes (n_g, N, L_pix); turn blocks: block and position_ids (B, T); packed samples:
        segment (B, T) too (llm.batch.pack_sequences).
        Returns loss and its parts (tensors)."""
        # Every module runs on every batch, on empty inputs when a modality is absent, so all ranks make the
        # same calls (ZeRO-3 gathers per module) and every trainable parameter gets a (zero) gradient.
        L = self.dims.depth_pix
        if und_feats is None:
            und_feats = self.codebooks.new_zeros(0, self.image_positions, self.dims.sem_dim)
        if gen_codes is None:
            gen_codes = input_ids.new_zeros(0, self.image_positions, L)
        emb = self.embed(input_ids, kind, und_feats, gen_codes)
        if block is not None or segment is not None:
            attention_mask = self.block_mask(attention_mask, block, emb.dtype, segment)
        h = self.hidden_states(emb, attention_mask, position_ids=position_ids).last_hidden_state  # (B, T, H)
        out: dict[str, Tensor] = {}
        loss = h.new_zeros((), dtype=torch.float32)  # + 0 * the logits of an absent part: all parameters in the graph
        sel = targets != IGNORE  # (B, T)
        logits = self.llm.get_output_embeddings()(h[sel])  # (n_text, V)
        if sel.any():
            out["text_loss"] = F.cross_entropy(logits.float(), targets[sel])
            out["text_acc"] = (logits.argmax(-1) == targets[sel]).float().mean()
        else:
            loss = loss + 0.0 * logits.sum()
        src = torch.zeros_like(sel)
        src[:, :-1] = kind[:, 1:] == GEN  # states right before each generation slot
        codes = gen_codes.reshape(-1, L)  # (M, L)
        logits = self.depth_logits(h[src], codes)  # (M, L, K)
        if codes.numel():
            per = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten(), reduction="none").view_as(codes)
            out["image_loss"] = per.mean()
            out["image_acc"] = (logits.argmax(-1) == codes).float().mean()
            for d in range(codes.shape[1]):  # per depth, for the logs (depth 1 carries most of the image)
                out[f"image_loss_d{d + 1}"] = per[:, d].mean().detach()
        else:
            loss = loss + 0.0 * logits.sum()
        out["loss"] = self.weighted_loss(out, loss)
        out["text_tokens"] = sel.sum()
        out["image_codes"] = src.sum() * self.dims.depth_pix
        return out

    def weighted_loss(self, out: dict[str, Tensor], base: Tensor) -> Tensor:
        """The loss: ``base`` + text_weight * text CE + image_weight * image CE, of the parts ``out`` has."""
        loss = base
        for name, weight in (("text", self.cfg.text_weight), ("image", self.cfg.image_weight)):
            if f"{name}_loss" in out:
                loss = loss + weight * out[f"{name}_loss"]
        return loss

    def merge_parts(self, outs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Outputs of :meth:`forward` on a batch's parts (``llm.batch.task_parts``) -> the whole batch's: text and
        image CE averaged over all their tokens / codes (as one forward of the whole batch would), and the
        :meth:`weighted_loss` of the averages."""
        if len(outs) == 1:
            return outs[0]
        out: dict[str, Tensor] = {}
        for name, count in (("text", "text_tokens"), ("image", "image_codes")):
            have = [o for o in outs if f"{name}_loss" in o]
            if have:
                n = sum(o[count] for o in have)
                for k in [k for k in have[0] if k.startswith(f"{name}_") and k != count]:  # loss, acc, per depth
                    out[k] = sum(o[k] * o[count] for o in have) / n
        out["loss"] = self.weighted_loss(out, sum(0.0 * o["loss"] for o in outs))  # keeps every part's graph
        out["text_tokens"] = sum(o["text_tokens"] for o in outs)
        out["image_codes"] = sum(o["image_codes"] for o in outs)
        return out

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, *, tokenizer_ref: dict, text_tokenizer=None) -> Path:
        """``llm/`` (HF save_pretrained), ``heads.safetensors``, ``unified_config.json`` (config, sizes, sampler
        defaults, tokenizer reference) and ``text_tokenizer/`` when given."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.llm.save_pretrained(str(out / LLM_DIR), safe_serialization=True)
        heads = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("llm.")}
        with atomic_path(out / HEADS_NAME) as tmp:
            save_file(heads, str(tmp), metadata={"format": FORMAT})
        if text_tokenizer is not None:
            text_tokenizer.save_pretrained(str(out / TEXT_TOKENIZER_DIR))
        meta = {"format": FORMAT, "model": to_dict(self.cfg), "dims": dataclasses.asdict(self.dims),
                "tokenizer": tokenizer_ref}
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, cfg: UnifiedConfig | None = None) -> UnifiedModel:
        """Rebuild a ``save_pretrained`` directory (safetensors only; the LLM through AutoModelForCausalLM).
        ``cfg`` replaces the saved config (e.g. stage 3 unfreezing the LLM); sizes always come from the save."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        src = Path(directory)
        meta = read_meta(src)
        saved = from_dict(UnifiedConfig, meta["model"], source=str(src / CONFIG_NAME))
        cfg = cfg or saved
        llm = AutoModelForCausalLM.from_pretrained(str(src / LLM_DIR), dtype=dtype,
                                                   attn_implementation=attn_implementation(cfg.llm, device),
                                                   trust_remote_code=cfg.llm.trust_remote_code)
        model = cls(dataclasses.replace(cfg, depth=saved.depth, projector_hidden=saved.projector_hidden,
                                        image_pos_embed=saved.image_pos_embed, und_pos_embed=saved.und_pos_embed,
                                        input_norm=saved.input_norm), llm,
                    Dims(**meta["dims"]))
        state = load_file(str(src / HEADS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("llm.")]
        if missing or unexpected:
            raise ValueError(f"{src / HEADS_NAME}: missing {missing[:8]}, unexpected {unexpected[:8]}")
        model = model.to(device)
        return model.to(dtype) if dtype is not None else model


def read_meta(directory: Path) -> dict:
    """``unified_config.json`` of an export, with a clear error when it is not one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a unified-model export directory)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def build_unified(cfg: UnifiedConfig, text_tokenizer, added_tokens: list[str], tokenizer, *,
                  field: str = "model", dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> UnifiedModel:
    """A fresh unified model: the LLM (pretrained or random), its vocabulary grown for the image special
    tokens (new rows initialised to the mean of the old ones), heads sized from the frozen ``tokenizer``
    (an EvoTokenizer), and its first L_pix codebooks copied in."""
    llm = build_llm(cfg.llm, len(text_tokenizer), field=f"{field}.llm", dtype=dtype, device=device)
    ids = {t: text_tokenizer.convert_tokens_to_ids(t) for t in IMAGE_SPECIALS}
    emb = llm.get_input_embeddings().weight
    if len(text_tokenizer) > emb.shape[0]:
        llm.resize_token_embeddings(len(text_tokenizer), mean_resizing=False)
    if cfg.llm.pretrained and added_tokens:
        n_old = len(text_tokenizer) - len(added_tokens)
        with torch.no_grad():
            for w in {id(m.weight): m.weight for m in (llm.get_input_embeddings(), llm.get_output_embeddings())}.values():
                mean = w[:n_old].float().mean(0)
                for t in added_tokens:
                    w[ids[t]] = mean.to(w.dtype)
    q = tokenizer.cfg.quantizer
    dims = Dims(sem_dim=tokenizer.semantic_decoder.head[-1].out_features, code_dim=q.dim, depth_pix=q.depth_pix,
                codebook_size=q.codebook_size, grid=tokenizer.encoder.grid_size,
                token_ids={"image": ids[IMAGE_TOKEN], "im_start": ids[IM_START], "im_end": ids[IM_END],
                           "pad": text_tokenizer.pad_token_id, "eos": text_tokenizer.eos_token_id},
                new_token_ids=sorted(ids.values()))
    model = UnifiedModel(cfg, llm, dims)
    if dtype is not None:
        model.to(dtype)
    with torch.no_grad():
        model.codebooks.copy_(tokenizer.quantizer.codebook[: q.depth_pix])
    return model
