"""The lmms-eval adapter against a real tiny exported checkpoint, with stand-ins shaped like lmms-eval's
``Instance`` (``.args`` = (context, gen_kwargs | continuation, doc_to_visual, doc_id, task, split)); a stub
``lmms_eval`` package checks the glue. lmms-eval itself is not needed (see docs/lmms_eval.md)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from test_llm_model import batch, build, evo, text_tok  # noqa: F401  (module fixtures)

from llm.conversation import to_messages
from unimllm.stages import lmms_adapter
from unimllm.stages.artifacts import tokenizer_reference
from unimllm.stages.lmms_adapter import UnimllmModel, stop_settings, truncate
from unimllm.stages.pipeline import UnifiedPipeline

QUESTIONS = ["Is the square blue?", "Describe the image.", "Is there a red circle?", "How many squares?",
             "Two objects: a square and a triangle?", "What color is the circle?"]
ANSWERS = ["Two objects: a square and a triangle.", "a photo of a red circle",
           "a photo of three green squares", "Yes", "No", "Describe the image."]


@dataclass
class Req:
    """Stand-in for ``lmms_eval.api.instance.Instance``: only ``.args`` is read."""

    args: tuple


@pytest.fixture(scope="module")
def export(evo, text_tok, tmp_path_factory):  # noqa: F811
    """A tiny Qwen2 unified model fitted for 60 steps to one reply per question (a random one only says
    "\n"), exported with the real save code."""
    out = tmp_path_factory.mktemp("lmms")
    evo.save_pretrained(out / "tok")
    m = build(evo, text_tok, "qwen2").train()
    b = batch(m, text_tok, evo, [[{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
                                 for q, a in zip(QUESTIONS, ANSWERS)])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        m(**b)["loss"].backward()
        opt.step()
    m.eval().save_pretrained(out / "m", tokenizer_ref=tokenizer_reference(out / "tok"),
                             text_tokenizer=text_tok)
    return out / "m"


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in QUESTIONS]
    return [{"image": Image.fromarray(im) if i % 2 else im, "q": q}  # PIL and uint8 arrays
            for i, (im, q) in enumerate(zip(imgs, QUESTIONS))]


def model(export, docs, **kw) -> UnimllmModel:
    m = UnimllmModel(pretrained=str(export), device="cpu", **kw)
    m.task_dict = {"fake": {"test": docs}}
    return m


def visual(doc):
    return [doc["image"]]


def gen(doc_id: int, **gen_kwargs) -> Req:
    return Req((QUESTIONS[doc_id], gen_kwargs, visual, doc_id, "fake", "test"))


def test_stop_settings_and_truncate():
    assert stop_settings({}, 7) == (7, 0.0, [])
    assert stop_settings({"until": "\n", "max_new_tokens": 3, "temperature": 0.5}, 7) == (3, 0.5, ["\n"])
    assert stop_settings({"until": ["", "."], "temperature": 0.9, "do_sample": False}, 7) == (7, 0.0, ["."])
    with pytest.raises(ValueError, match="until"):
        stop_settings({"until": 3}, 7)
    assert truncate("abc. def\nx", ["\n", "."]) == "abc" and truncate("abc", ["z"]) == "abc"


def test_generate_until_order_max_new_tokens_until_and_determinism(export, docs):
    lm = model(export, docs, batch_size=1)
    pipe = lm.pipe
    raw = {(i, n): pipe.answer([d["image"]], [d["q"]], max_new_tokens=n, batch=1)[0]
           for i, d in enumerate(docs) for n in (2, 8)}
    assert len(raw[0, 2]) < len(raw[0, 8]) and " of" in raw[1, 8][2:], raw  # limit and stop string matter
    reqs = [gen(0, max_new_tokens=2), gen(1, max_new_tokens=8, until=[" of", "\x00never"]),
            gen(2, max_new_tokens=8), gen(3, max_new_tokens=2, until=[]),
            gen(1, max_new_tokens=8, temperature=0, do_sample=False)]
    got = lm.generate_until(reqs)
    assert all(isinstance(s, str) for s in got)
    cut = raw[1, 8][: raw[1, 8].index(" of")]
    assert got == [raw[0, 2], cut, raw[2, 8], raw[3, 2], raw[1, 8]]  # request order
    assert lm.generate_until(reqs) == got
    assert lm.generate_until(reqs[::-1]) == got[::-1]


def test_batched_requests_match_the_pipeline(export, docs):
    lm = model(export, docs, batch_size=4)
    reqs = [gen(i, max_new_tokens=5, until=["\n\n"]) for i in range(len(docs))]
    got = lm.generate_until(reqs)
    want = lm.pipe.answer([d["image"] for d in docs], QUESTIONS, max_new_tokens=5, batch=4)
    assert got == [truncate(w, ["\n\n"]) for w in want] and lm.generate_until(reqs) == got


def test_loglikelihood_is_the_training_text_loss_and_flags_greedy(export, docs, text_tok):  # noqa: F811
    lm = model(export, docs)
    pipe, m = lm.pipe, lm.pipe.model
    enc, q = pipe.encoder, QUESTIONS[0]
    conv = [{"from": "human", "value": f"<image>\n{q}"},
            {"from": "gpt", "value": "Two objects: a square."}]  # not quite its answer
    cont = enc.segments(to_messages(conv))[-1][0]  # reply + end of turn
    e = enc.encode(conv)
    feats = pipe.tokenizer.semantic_features(pipe.image_codes([docs[0]["image"]]))
    t = lambda a: torch.from_numpy(a)[None].long()  # noqa: E731
    with torch.no_grad():
        out = m(t(e.input_ids), torch.ones_like(t(e.input_ids)), t(e.targets), t(e.kind), und_feats=feats)
    n = int((e.targets != -100).sum())

    def ll(c):
        return Req((q, c, visual, 0, "fake", "test"))

    (lp, greedy), (lp_fn, _), (empty, g0) = lm.score([ll(cont), ll(lambda doc: cont), ll("")])
    torch.testing.assert_close(lp, -float(out["text_loss"]) * n, rtol=1e-5, atol=1e-4)
    assert lp == lp_fn and greedy is (float(out["text_acc"]) == 1.0) and (empty, g0) == (0.0, True)
    assert lm.loglikelihood([ll(cont)]) == [(-lp, greedy)]  # lmms-eval's argmin convention: a loss
    assert model(export, docs, ll_mode="logprob").loglikelihood([ll(cont)]) == [(lp, greedy)]

    ids, kind = enc.understanding_prompt(q)  # reference next-token distribution through the HF LM head
    x = torch.tensor([ids])
    with torch.no_grad():
        emb = m.embed(x, torch.from_numpy(kind)[None].long(), und_feats=feats)
        logits = m.llm(inputs_embeds=emb).logits[0, -1]
    logp = torch.log_softmax(logits.float(), -1)
    single = [i for i in range(len(text_tok))  # tokens that survive decode -> encode
              if text_tok(text_tok.decode([i]), add_special_tokens=False)["input_ids"] == [i]]
    best = max(single, key=lambda i: float(logp[i]))
    res = lm.score([ll(text_tok.decode([i])) for i in single])
    torch.testing.assert_close(torch.tensor([r[0] for r in res]), logp[single], rtol=1e-5, atol=1e-5)
    assert [r[1] for r in res] == [i == best and int(logp.argmax()) == best for i in single]
    assert any(r[1] for r in res)  # the fitted model's first reply token is an ordinary one


def test_refusals(export, docs):
    lm = model(export, docs)
    two = Req(("q", {}, lambda doc: [doc["image"], doc["image"]], 0, "fake", "test"))
    with pytest.raises(ValueError, match="exactly one image"):
        lm.generate_until([two])
    with pytest.raises(ValueError, match="exactly one image"):
        lm.generate_until([Req(("q", {}, lambda doc: ["a.mp4"], 0, "fake", "test"))])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([gen(0)])
    with pytest.raises(TypeError, match="unknown"):
        UnimllmModel(pretrained=str(export), colour="red")
    with pytest.raises(ValueError, match="pretrained"):
        UnimllmModel()
    with pytest.raises(ValueError, match="ll_mode"):
        UnimllmModel(pretrained=str(export), ll_mode="loss")


STUB = {  # what the glue touches: 0.4/0.5 registry (no MODEL_REGISTRY_V2), 0.7 GenerationResult
    "api/__init__.py": "",
    "api/instance.py": ("import dataclasses\n@dataclasses.dataclass\n"
                        "class GenerationResult:\n    text: object\n"),
    "api/model.py": (
        "import abc\n"
        "class lmms(abc.ABC):\n"
        "    is_simple = True\n"
        "    def __init__(self):\n"
        "        self._rank, self._world_size, self.task_dict = 0, 1, {}\n"
        "    @abc.abstractmethod\n    def loglikelihood(self, requests): ...\n"
        "    @abc.abstractmethod\n    def generate_until(self, requests): ...\n"
        "    @abc.abstractmethod\n    def generate_until_multi_round(self, requests): ...\n"),
    "api/registry.py": "MODEL_REGISTRY = {}\ndef register_model(*names):\n"
                       "    def deco(cls):\n        MODEL_REGISTRY.update(dict.fromkeys(names, cls))\n"
                       "        return cls\n"
                       "    return deco\n",
    "models/__init__.py": "AVAILABLE_SIMPLE_MODELS = {}\n",
    "__init__.py": "",
}


def test_glue_is_lazy_and_mixes_into_lmms(export, docs, tmp_path, monkeypatch):
    if importlib.util.find_spec("lmms_eval") is None:
        with pytest.raises(ModuleNotFoundError):
            lmms_adapter.Unimllm  # noqa: B018  (the core above ran without lmms_eval)
    for rel, text in STUB.items():
        (tmp_path / "lmms_eval" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "lmms_eval" / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [k for k in sys.modules if k == "lmms_eval" or k.startswith("lmms_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(lmms_adapter, "_CLASS", None)
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import MODEL_REGISTRY
    from lmms_eval.models import AVAILABLE_SIMPLE_MODELS

    cls = lmms_adapter.Unimllm
    assert issubclass(cls, lmms) and cls is lmms_adapter.lmms_class() and MODEL_REGISTRY["unimllm"] is cls
    lmms_adapter.register()
    assert AVAILABLE_SIMPLE_MODELS["unimllm"] == "unimllm.stages.lmms_adapter.Unimllm"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    lm = cls(pipeline=UnifiedPipeline.from_pretrained(export), batch_size="auto", max_batch_size=64)
    assert (lm.rank, lm.world_size, lm.batch_size, lm.task_dict) == (1, 2, 16, {})
    lm.task_dict = {"fake": {"test": docs}}
    core = model(export, docs)
    assert lm.generate_until([gen(0, max_new_tokens=2)]) == core.generate_until([gen(0, max_new_tokens=2)])
    from lmms_eval.api.instance import GenerationResult

    ll = [Req(("q", " Yes", visual, 0, "fake", "test"))]
    (wrapped,) = lm.loglikelihood(ll)  # 0.7 would turn a bare (float, bool) into its str()
    assert isinstance(wrapped, GenerationResult) and wrapped.text == core.loglikelihood(ll)[0]
    assert lm.device == torch.device("cpu")
