"""lmms-eval adapter: a unimllm export as the lmms-eval model ``unimllm`` (classic "simple" interface).

    python -m unimllm.stages.lmms_adapter --model unimllm --model_args pretrained=runs/stage2/tiny/export/unified \
        --tasks mme --batch_size 16 --output_path runs/lmms_eval
    accelerate launch --num_processes 8 -m unimllm.stages.lmms_adapter --model unimllm ...   # data parallel

``python -m unimllm.stages.lmms_adapter`` registers the model, then runs lmms-eval's own CLI with the same arguments.
Plain ``lmms-eval --model unimllm`` works once the entry point ``lmms_eval.models: unimllm =
unimllm.stages.lmms_adapter:manifest`` is declared (docs/lmms_eval.md). lmms_eval is imported only on demand: the core
(``UnimllmModel``: requests -> ``UnifiedPipeline.answer`` / continuation log-probs) needs none of it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

MODEL_ID, CLASS_PATH = "unimllm", "unimllm.stages.lmms_adapter.Unimllm"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stop_settings(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[int, float, list[str]]:
    """(max_new_tokens, temperature, until) from a task's gen_kwargs (read, never mutated); do_sample=False
    forces greedy. Other keys (top_p, num_beams, ...) are ignored: decoding is greedy or plain sampling."""
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)):
        raise ValueError(f"gen_kwargs['until'] must be a str or a list of str, not {type(until).__name__}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample") is False:
        temperature = 0.0
    max_new_tokens = int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens)
    return max_new_tokens, temperature, [u for u in until if u]


def truncate(text: str, until: list[str]) -> str:
    """``text`` up to the earliest stop string (generation itself stops only at end-of-turn)."""
    cut = min((i for i in (text.find(u) for u in until) if i >= 0), default=len(text))
    return text[:cut]


class UnimllmModel:
    """lmms-eval's model interface over a ``UnifiedPipeline``; the registered class mixes in ``lmms``.

    One image per request (the model was trained on one image per sample); lmms-eval shards documents by
    RANK/WORLD_SIZE itself, so each process runs the requests it is given on cuda:LOCAL_RANK.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, tokenizer_dir: str | None = None,
                 device: str | None = None, dtype: str = "auto", batch_size: int | str = 16,
                 max_new_tokens: int = 128, seed: int = 0, ll_mode: str = "nll", pipeline: Any = None,
                 **unused: Any):
        super().__init__()  # lmms.__init__ when mixed in: rank 0 / world 1, cache hook, task_dict
        from unimllm.stages.pipeline import UnifiedPipeline

        unused.pop("max_batch_size", None)  # passed by the lmms-eval CLI; batches are fixed-size here
        if unused:
            raise TypeError(f"unimllm model_args: unknown {sorted(unused)}")
        if ll_mode not in ("nll", "logprob"):
            raise ValueError(f"unimllm model_args: ll_mode={ll_mode!r}, expected nll or logprob")
        self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if pipeline is None:
            if not pretrained:
                raise ValueError("unimllm model_args: pretrained=EXPORT_DIR is required")
            if device in (None, "cuda") and torch.cuda.is_available():
                device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            device = device or "cpu"
            if dtype == "auto":
                dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
            if dtype not in DTYPES:
                raise ValueError(f"unimllm model_args: dtype={dtype!r}, expected auto or one of "
                                 f"{sorted(DTYPES)}")
            pipeline = UnifiedPipeline.from_pretrained(pretrained, tokenizer_dir=tokenizer_dir, device=device,
                                                       dtype=DTYPES[dtype])
        self.pipe = pipeline
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> 16
        self.max_new_tokens, self.seed, self.ll_mode = int(max_new_tokens), int(seed), ll_mode
        self.task_dict: dict = getattr(self, "task_dict", {})

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self) -> torch.device:  # lmms-eval puts its cross-rank counts here
        return self.pipe.device

    # ------------------------------------------------------------------ requests
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual, task: str, split: str, doc_id: int) -> Any:
        """The request's single image (PIL or uint8 array); anything else is refused, not guessed at."""
        import numpy as np
        from PIL import Image

        visuals = doc_to_visual(self._doc(task, split, doc_id))
        if isinstance(visuals, (Image.Image, np.ndarray)):
            visuals = [visuals]
        visuals = [v for v in visuals or [] if v is not None]
        if len(visuals) != 1 or not isinstance(visuals[0], (Image.Image, np.ndarray)):
            kinds = [type(v).__name__ for v in visuals]
            raise ValueError(f"unimllm answers about exactly one image; {task}/{split} doc {doc_id} "
                             f"has {kinds}")
        return visuals[0]

    @staticmethod
    def _context(contexts: Any) -> str:
        return contexts[0] if isinstance(contexts, list) else contexts

    def generate_until(self, requests: list) -> list[str]:
        """Replies in request order; requests sharing (max_new_tokens, temperature) are batched together."""
        settings = [stop_settings(r.args[1] or {}, self.max_new_tokens) for r in requests]
        out: list[str | None] = [None] * len(requests)
        for key in dict.fromkeys((n, t) for n, t, _ in settings):
            idx = [i for i, s in enumerate(settings) if s[:2] == key]
            images, questions = [], []
            for i in idx:
                contexts, _, doc_to_visual, doc_id, task, split = requests[i].args
                images.append(self._image(doc_to_visual, task, split, doc_id))
                questions.append(self._context(contexts))
            replies = self.pipe.answer(images, questions, max_new_tokens=key[0], temperature=key[1],
                                       batch=self.batch_size, seed=self.seed)
            for i, reply in zip(idx, replies):
                out[i] = truncate(reply, settings[i][2])
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        """``score`` with the first value negated unless ll_mode=logprob: lmms-eval (>= 0.3) picks a multiple
        choice answer by argmin, as its own adapters return a loss."""
        sign = 1.0 if self.ll_mode == "logprob" else -1.0
        return [(sign * lp, greedy) for lp, greedy in self.score(requests)]

    @torch.no_grad()
    def score(self, requests: list) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens | image, context), continuation == greedy decoding) per request;
        the continuation is scored verbatim as the start of the assistant reply, the context as the user
        turn."""
        pipe, m = self.pipe, self.pipe.model
        feats: dict[tuple, torch.Tensor] = {}  # per document: several continuations share one image
        res = []
        for r in requests:
            contexts, target, doc_to_visual, doc_id, task, split = r.args
            cont = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            if (task, split, doc_id) not in feats:
                codes = pipe.image_codes([self._image(doc_to_visual, task, split, doc_id)])
                feats[(task, split, doc_id)] = pipe.tokenizer.semantic_features(codes)  # (1, N, C)
            ids, kind = pipe.encoder.understanding_prompt(self._context(contexts))
            cids = pipe.text_tokenizer(cont, add_special_tokens=False)["input_ids"]
            if not cids:
                res.append((0.0, True))
                continue
            x = torch.tensor([ids + cids], device=pipe.device)  # (1, T)
            k = torch.zeros_like(x)
            k[0, : len(kind)] = torch.from_numpy(kind).to(x)
            emb = m.embed(x, k, und_feats=feats[(task, split, doc_id)])
            h = m.hidden_states(emb, torch.ones_like(x)).last_hidden_state[0, len(ids) - 1: -1]  # (n_cont, H)
            logp = torch.log_softmax(m.llm.get_output_embeddings()(h).float(), -1)  # (n_cont, V)
            target_ids = x[0, len(ids):]
            res.append((float(logp.gather(1, target_ids[:, None]).sum()),
                        bool((logp.argmax(-1) == target_ids).all())))
        return res

    def generate_until_multi_round(self, requests: list) -> list[str]:
        raise NotImplementedError("unimllm answers single-turn questions; multi-round tasks are unsupported")


# ---------------------------------------------------------------------- lmms-eval glue (imports lmms_eval)
_CLASS: type | None = None


def lmms_class() -> type:
    """``Unimllm``: ``UnimllmModel`` mixed into ``lmms_eval.api.model.lmms`` (built once, on first use)."""
    global _CLASS
    if _CLASS is None:
        from lmms_eval.api.model import lmms

        try:  # 0.7+ turns responses other than str / GenerationResult into str, (logp, greedy) included
            from lmms_eval.api.instance import GenerationResult
        except ImportError:
            GenerationResult = None

        def loglikelihood(self, requests: list) -> list:
            res = UnimllmModel.loglikelihood(self, requests)
            return res if GenerationResult is None else [GenerationResult(text=r) for r in res]

        _CLASS = type("Unimllm", (UnimllmModel, lmms), {"__module__": __name__, "__qualname__": "Unimllm",
                                                         "loglikelihood": loglikelihood})
        try:  # the older name registry; 0.6+ resolve names through MODEL_REGISTRY_V2 instead
            from lmms_eval.api.registry import register_model

            register_model(MODEL_ID)(_CLASS)
        except ImportError:
            pass
    return _CLASS


def __getattr__(name: str) -> Any:  # ``unimllm.stages.lmms_adapter.Unimllm`` is what lmms-eval's registry imports
    if name == "Unimllm":
        return lmms_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def manifest():
    """Entry-point payload for the ``lmms_eval.models`` group (lmms-eval >= 0.6)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make ``--model unimllm`` resolvable in this process (lmms-eval 0.6+ registry, or the 0.4/0.5 table)."""
    import lmms_eval.models as models

    if hasattr(models, "MODEL_REGISTRY_V2"):
        models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    models.AVAILABLE_SIMPLE_MODELS[MODEL_ID] = CLASS_PATH


def main(argv: list[str] | None = None) -> None:
    """Register ``unimllm``, then run lmms-eval's CLI on ``argv`` (default: this process's arguments)."""
    register()
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
