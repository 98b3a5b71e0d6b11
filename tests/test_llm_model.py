"""The unified model on tiny random-init Qwen2 and Llama: label masking, <image> splicing, depth-head teacher
forcing, cached == uncached sampling, save/load, and what a frozen LLM trains."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data.schema import SampleError
from llm.config import DepthConfig, LLMConfig, SamplerConfig, UnifiedConfig
from llm.conversation import GEN, IGNORE, TEXT, UND, ConversationEncoder
from llm.model import UnifiedModel, build_unified
from llm.text_tokenizer import train_text_tokenizer
from tokenizer.config import PixelDecoderConfig, QuantizerConfig, TokenizerConfig, VisionTowerConfig
from tokenizer.model import EvoTokenizer
from unimllm.stages.artifacts import tokenizer_reference
from unimllm.stages.pipeline import UnifiedPipeline

TEXTS = ["a photo of a red circle", "Is the square blue? Please answer yes or no.", "Yes", "No",
         "Two objects: a square and a triangle.", "Describe the image.", "a photo of three green squares"] * 20
UND_CONV = [{"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nIs the square blue? Please answer yes or no."},
            {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": "Describe the image."},
            {"from": "gpt", "value": "Two objects: a square and a triangle."}]
GEN_CONV = [{"from": "human", "value": "a photo of a red circle"}, {"from": "gpt", "value": "<image>"}]


@pytest.fixture(scope="module")
def evo():
    torch.manual_seed(0)
    tower = VisionTowerConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                              intermediate_size=64)
    cfg = TokenizerConfig(encoder=tower, teacher=dataclasses.replace(tower),
                          quantizer=QuantizerConfig(codebook_size=64, depth_sem=6, depth_pix=3),
                          pixel_decoder=PixelDecoderConfig(channels=16, z_channels=16, channel_mult=(1, 1, 2, 2)))
    return EvoTokenizer(cfg, with_teacher=False).eval()


@pytest.fixture(scope="module")
def text_tok():
    return train_text_tokenizer(TEXTS, 300)


def build(evo, text_tok, arch: str, **kw) -> UnifiedModel:
    torch.manual_seed(1)
    cfg = UnifiedConfig(llm=LLMConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                      intermediate_size=64),
                        depth=DepthConfig(layers=2, width=32, heads=4), freeze_llm=False, **kw)
    return build_unified(cfg, text_tok, [], evo)


def batch(model: UnifiedModel, text_tok, evo, convs: list[list[dict]]):
    enc = ConversationEncoder(text_tok, model.image_positions, 512)
    es = [enc.encode(c) for c in convs]
    T = max(len(e.input_ids) for e in es)

    def pad(a, v):
        return torch.from_numpy(np.stack([np.pad(x, (0, T - len(x)), constant_values=v) for x in a]))

    torch.manual_seed(2)
    codes = torch.randint(0, 64, (len(es), 4, 4, 6))  # (B, h, w, L_sem)
    und = [i for i, e in enumerate(es) if e.direction == "understanding"]
    gen = [i for i, e in enumerate(es) if e.direction == "generation"]
    return dict(input_ids=pad([e.input_ids for e in es], 0), targets=pad([e.targets for e in es], IGNORE),
                kind=pad([e.kind for e in es], 0).long(), attention_mask=pad([np.ones(len(e.input_ids)) for e in es], 0).long(),
                und_feats=evo.semantic_features(codes[und]), gen_codes=codes[gen][..., :3].flatten(1, 2))


def test_labels_are_exactly_the_assistant_replies(text_tok):
    enc = ConversationEncoder(text_tok, image_positions=16, max_length=512)
    for conv, replies in ((UND_CONV, ["Yes", "Two objects: a square and a triangle."]),
                          (GEN_CONV, ["<im_start><image><im_end>"])):
        e = enc.encode(conv)
        labeled = e.targets[e.targets != IGNORE]
        want = "".join(r + "<|im_end|>\n" for r in replies).replace("<image>", "")
        assert text_tok.decode(labeled.tolist()) == want  # nothing from system/user turns or headers
        nxt = np.flatnonzero(e.targets != IGNORE) + 1  # the positions whose token is a target
        assert (e.input_ids[nxt] == labeled).all() and (e.kind[nxt] == TEXT).all()


def test_image_slots_and_truncation(text_tok):
    enc = ConversationEncoder(text_tok, image_positions=16, max_length=512)
    und, gen = enc.encode(UND_CONV), enc.encode(GEN_CONV)
    u = np.flatnonzero(und.kind == UND)
    assert len(u) == 16 and (np.diff(u) == 1).all() and not (und.kind == GEN).any()
    assert text_tok.decode(und.input_ids[: u[0]].tolist()).endswith("<|im_start|>user\n")
    g = np.flatnonzero(gen.kind == GEN)
    assert len(g) == 16 and (np.diff(g) == 1).all()
    ids = text_tok.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    assert gen.input_ids[g[0] - 1] == ids[0] and gen.input_ids[g[-1] + 1] == ids[1]
    short = ConversationEncoder(text_tok, image_positions=16, max_length=len(und.input_ids) - 3)
    cut = short.encode(UND_CONV)  # the cut falls in the last reply: kept, truncated
    assert len(cut.input_ids) == len(und.input_ids) - 3 and cut.targets[-1] == IGNORE
    with pytest.raises(SampleError, match="inside an image"):
        ConversationEncoder(text_tok, image_positions=16, max_length=int(u[-1])).encode(UND_CONV)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_splicing_loss_and_teacher_forcing(evo, text_tok, arch):
    model = build(evo, text_tok, arch).eval()
    b = batch(model, text_tok, evo, [UND_CONV, GEN_CONV, GEN_CONV])
    emb = model.embed(b["input_ids"], b["kind"], b["und_feats"], b["gen_codes"])
    tok_emb = model.llm.get_input_embeddings()(b["input_ids"])
    kind = b["kind"]
    assert torch.equal(emb[kind == TEXT], tok_emb[kind == TEXT])
    assert torch.allclose(emb[kind == UND], model.und_inputs(b["und_feats"]).flatten(0, 1))
    assert torch.allclose(emb[kind == GEN], model.gen_inputs(b["gen_codes"]).flatten(0, 1))

    out = model(**b)
    h = model.hidden_states(emb, b["attention_mask"]).last_hidden_state
    sel = b["targets"] != IGNORE
    ref = torch.nn.functional.cross_entropy(model.llm.get_output_embeddings()(h[sel]), b["targets"][sel])
    torch.testing.assert_close(out["text_loss"], ref)
    assert int(out["image_codes"]) == 2 * 16 * 3

    # depth head: teacher forcing on the states right before each slot, causal over positions and depths
    src = torch.zeros_like(sel)
    src[:, :-1] = kind[:, 1:] == GEN
    assert (b["input_ids"][src][::16] == text_tok.convert_tokens_to_ids("<im_start>")).all()
    codes = b["gen_codes"].flatten(0, 1)  # (M, L)
    logits = model.depth_logits(h[src], codes)
    assert logits.shape == (2 * 16, 3, 64)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten())
    torch.testing.assert_close(out["image_loss"], ref)
    changed = codes.clone()
    changed[:, 1:] = (changed[:, 1:] + 1) % 64  # depth >= 1 changes: depth-0 and depth-1 logits must not
    lc = model.depth_logits(h[src], changed)
    torch.testing.assert_close(lc[:, :2], logits[:, :2])
    assert not torch.allclose(lc[:, 2], logits[:, 2])
    b2 = dict(b, gen_codes=b["gen_codes"].clone())
    b2["gen_codes"][:, 5] = (b2["gen_codes"][:, 5] + 1) % 64  # position 5 changes: states up to slot 5 must not
    h2 = model.hidden_states(model.embed(b2["input_ids"], kind, b2["und_feats"], b2["gen_codes"]),
                             b["attention_mask"]).last_hidden_state
    g = kind[1] == GEN
    torch.testing.assert_close(h2[1][g][:5], h[1][g][:5])
    assert not torch.allclose(h2[1][g][5], h[1][g][5])


@pytest.mark.parametrize("arch,pos", [("qwen2", False), ("llama", False), ("qwen2", True)])
def test_cached_sampling_equals_uncached(evo, text_tok, arch, pos):
    model = build(evo, text_tok, arch, sampler=SamplerConfig(cfg_scale=2.5, temperature=1.0, top_k=20, top_p=0.9),
                  image_pos_embed=pos)
    if pos:  # the grid-position embedding starts at zero; make it matter
        torch.nn.init.normal_(model.gen_pos, std=1.0)
    model = model.double().eval()
    pipe = UnifiedPipeline(model, evo, text_tok)
    prompts = ["a photo of a red circle", "a photo of three green squares", ""]
    cached = pipe.generate_codes(prompts, seed=3, batch=2, cache=True)
    assert cached.shape == (3, 4, 4, 3)
    assert torch.equal(cached, pipe.generate_codes(prompts, seed=3, batch=2, cache=False))
    assert torch.equal(cached, pipe.generate_codes(prompts, seed=3, batch=3, cache=True))  # batch-independent
    assert not torch.equal(cached, pipe.generate_codes(prompts, seed=4, batch=2, cache=True))
    greedy = pipe.generate_codes(prompts[:2], temperature=0.0, cfg_scale=1.0)
    assert torch.equal(greedy, pipe.generate_codes(prompts[:2], temperature=0.0, cfg_scale=1.0, cache=False))


def test_save_load_roundtrip_and_tokenizer_check(evo, text_tok, tmp_path):
    model = build(evo, text_tok, "qwen2", image_pos_embed=True, input_norm=True).eval()
    torch.nn.init.normal_(model.gen_pos)
    data = torch.randint(0, 64, (8, 4, 4, 6))  # (n, h, w, L_sem)
    feats = evo.semantic_features(data)
    model.set_input_stats(feats, data[..., :3].flatten(1, 2))
    z = model._standardize(feats, "und_stats").flatten(0, 1)  # the measured data comes out standardised
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(z.shape[1]), atol=1e-5, rtol=0)
    codes = torch.randint(0, 64, (2, 16, 3))  # (n, N, L): every slot adds its own grid position's embedding
    ref = model.gen_projector(model._standardize(model.code_vectors(codes).sum(-2), "gen_stats")) + model.gen_pos
    torch.testing.assert_close(model.gen_inputs(codes), ref)
    torch.testing.assert_close(model.gen_inputs(codes[:, 5], position=5), ref[:, 5])  # one position (sampling)

    evo.save_pretrained(tmp_path / "tok")
    model.save_pretrained(tmp_path / "m", tokenizer_ref=tokenizer_reference(tmp_path / "tok"), text_tokenizer=text_tok)
    pipe = UnifiedPipeline.from_pretrained(tmp_path / "m")
    b = batch(model, text_tok, evo, [UND_CONV, GEN_CONV])
    torch.testing.assert_close(pipe.model(**b)["loss"], model(**b)["loss"], rtol=0, atol=0)
    img = np.zeros((32, 32, 3), np.uint8)
    assert len(pipe.answer([img], ["Is the square blue?"], max_new_tokens=3)) == 1
    assert pipe.generate_image(["a photo of a red circle"])[0].shape == (32, 32, 3)
    other = EvoTokenizer(evo.cfg, with_teacher=False)
    other.save_pretrained(tmp_path / "tok2")
    with pytest.raises(ValueError, match="not the tokenizer"):
        UnifiedPipeline.from_pretrained(tmp_path / "m", tokenizer_dir=tmp_path / "tok2")


def test_frozen_llm_trains_only_heads_and_new_token_rows(evo, text_tok):
    model = build(evo, text_tok, "qwen2")
    model.cfg = dataclasses.replace(model.cfg, freeze_llm=True)
    groups = model.configure_trainable()
    opt = torch.optim.AdamW(groups, lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(**batch(model, text_tok, evo, [UND_CONV, GEN_CONV]))["loss"].backward()
    opt.step()
    after = model.state_dict()
    embs = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")  # tied in the tiny LLM
    rows = torch.zeros(len(after[embs[0]]), dtype=torch.bool)
    rows[model.dims.new_token_ids] = True
    for emb in embs:
        assert torch.equal(after[emb][~rows], before[emb][~rows]) and not torch.equal(after[emb][rows], before[emb][rows])
    llm_changed = [k for k in after if k.startswith("llm.") and k not in embs and not torch.equal(after[k], before[k])]
    assert llm_changed == []
    assert not torch.equal(after["depth.in_h.weight"], before["depth.in_h.weight"])
    assert torch.equal(after["codebooks"], evo.quantizer.codebook[:3])


def test_task_parts_give_the_whole_batch_loss_and_gradient(evo, text_tok):
    """mix.split_tasks: one forward per task on its own rows (each cut to its own length) merges into exactly
    the loss and gradients of one forward over the whole padded batch."""
    from llm.batch import collate_sequences, task_parts

    model = build(evo, text_tok, "qwen2", image_pos_embed=True).double().train()
    enc = ConversationEncoder(text_tok, model.image_positions, 512)
    convs = [UND_CONV, GEN_CONV, UND_CONV[:3], GEN_CONV]
    torch.manual_seed(3)
    samples = []
    for i, c in enumerate(convs):
        e = enc.encode(c)
        samples.append({"__key__": str(i), "input_ids": e.input_ids, "targets": e.targets, "kind": e.kind,
                        "codes": torch.randint(0, 64, (4, 4, 6)).numpy()})
    b = collate_sequences(samples, 0)

    def inputs(x):
        gen, und = (x["kind"] == GEN).any(1), (x["kind"] == UND).any(1)
        return dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"], targets=x["targets"], kind=x["kind"],
                    und_feats=evo.semantic_features(x["codes"][und]).double() if und.any() else None,
                    gen_codes=x["codes"][gen][..., :3].flatten(1, 2))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole = model(**inputs(b))
    parts = task_parts(b)
    assert len(parts) == 2 and parts[0]["input_ids"].shape[1] < b["input_ids"].shape[1]  # generation rows: shorter
    merged = model.merge_parts([model(**inputs(p)) for p in parts])
    for k in ("loss", "text_loss", "image_loss", "image_loss_d2"):
        torch.testing.assert_close(merged[k].double(), whole[k].double(), rtol=1e-6, atol=1e-7)  # CE runs in fp32
    g_whole = grads(model(**inputs(b))["loss"])
    g_merged = grads(model.merge_parts([model(**inputs(p)) for p in parts])["loss"])
    for a, c in zip(g_whole, g_merged):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("split_tasks, blocks", [(False, False), (True, False), (False, True)])
def test_packed_rows_give_the_unpacked_loss_and_gradient(evo, text_tok, split_tasks, blocks):
    """mix.pack: samples packed into rows (each attending to itself, positions restarting) give the loss and the
    gradients of the same samples one per row; with split_tasks the two tasks are packed apart; with turn blocks
    (mix.independent_turns) the blocks stay blocks inside their sample."""
    from llm.batch import collate_sequences, pack_sequences, task_parts

    model = build(evo, text_tok, "qwen2", image_pos_embed=True).double().train()
    enc = ConversationEncoder(text_tok, model.image_positions, 512)
    convs = [UND_CONV, GEN_CONV, UND_CONV[:3], GEN_CONV, UND_CONV[:3]]
    torch.manual_seed(3)
    samples = []
    for i, c in enumerate(convs):
        e = enc.encode_blocks([c[:3], c]) if blocks and i % 2 == 0 else enc.encode(c)
        row = {"__key__": str(i), "input_ids": e.input_ids, "targets": e.targets, "kind": e.kind,
               "codes": torch.randint(0, 64, (4, 4, 6)).numpy()}
        if e.block is not None:
            row.update(block=e.block, position=e.position)
        samples.append(row)

    def inputs(x):
        if "image_role" in x:
            gen, und = x["image_role"] == GEN, x["image_role"] == UND
        else:
            gen, und = (x["kind"] == GEN).any(1), (x["kind"] == UND).any(1)
        out = dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"], targets=x["targets"], kind=x["kind"],
                   und_feats=evo.semantic_features(x["codes"][und]).double() if und.any() else None,
                   gen_codes=x["codes"][gen][..., :3].flatten(1, 2))
        if "block" in x:
            out.update(block=x["block"], position_ids=x["position"])
        if "segment" in x:
            out["segment"] = x["segment"]
        return out

    def loss(b):
        parts = task_parts(b) if split_tasks else [b]
        return model.merge_parts([model(**inputs(p)) for p in parts])

    def grads(b):
        model.zero_grad()
        loss(b)["loss"].backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = collate_sequences(samples, 0)
    packed = pack_sequences(samples, 0, max_tokens=2 * max(len(s["input_ids"]) for s in samples), split_tasks=split_tasks)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # fewer rows, less padding
    assert packed["attention_mask"].float().mean() > plain["attention_mask"].float().mean()
    a, b = loss(plain), loss(packed)
    for k in ("loss", "text_loss", "image_loss", "text_acc", "image_loss_d2"):
        torch.testing.assert_close(b[k].double(), a[k].double(), rtol=1e-6, atol=1e-7)
    for g1, g2 in zip(grads(plain), grads(packed)):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_depth_transformer_under_cuda_bf16_autocast():
    """The training shape (thousands of positions x 3-4 slots) under CUDA bf16 autocast: torch 2.11's fused
    SDPA returned None here, so the depth transformer computes its attention explicitly."""
    from llm.config import DepthConfig
    from llm.depth import DepthTransformer

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    depth = DepthTransformer(DepthConfig(layers=2, width=256, heads=8), 256, 32, 4, 128).cuda()
    h, cum = torch.randn(2500, 256, device="cuda"), torch.randn(2500, 3, 32, device="cuda")
    ref = depth(h, cum)  # (M, L, K) fp32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = depth(h, cum)
    assert out.shape == (2500, 4, 128) and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in depth.parameters() if p.grad is not None)


def test_depth_attention_equals_sdpa():
    """The depth transformer's explicit attention is causal scaled-dot-product attention (checked against
    torch's SDPA, whole prefix and one cached slot)."""
    import torch.nn.functional as F

    from llm.depth import _Block

    torch.manual_seed(0)
    blk = _Block(32, 4, 2.0, 0.0).double()
    x = torch.randn(5, 3, 32, dtype=torch.double)  # (M, S, W)
    out, (k, v) = blk(x)
    q = blk.qkv(blk.ln1(x)).view(5, 3, 3, 4, 8).permute(2, 0, 3, 1, 4)[0]
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = x + blk.proj(a.transpose(1, 2).reshape(5, 3, 32))
    torch.testing.assert_close(out, h + blk.mlp(blk.ln2(h)))
    step, _ = blk(x[:, 2:], cache=(k[:, :, :2], v[:, :, :2]))  # the last slot from a 2-slot cache
    torch.testing.assert_close(step, out[:, 2:])


QA_TURNS = [("Is the square blue? Please answer yes or no.", "Yes"),
            ("Describe the image.", "Two objects: a square and a triangle. Two objects: a square and a triangle."),
            ("Is there a red circle? Please answer yes or no.", "No")]


def single_turns(qas) -> list[list[dict]]:
    return [[{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"<image>\n{q}"},
             {"from": "gpt", "value": a}] for q, a in qas]


def test_turn_blocks_pack_single_turn_conversations(text_tok):
    """mix.independent_turns: the shared prefix (through the image) once, then each turn's remainder as its own
    block with positions continuing from the prefix; blocks that do not fit max_length are left out."""
    from unimllm.stages.samples import SequenceSample

    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"<image>\n{QA_TURNS[0][0]}"},
            {"from": "gpt", "value": QA_TURNS[0][1]}]
    for q, a in QA_TURNS[1:]:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    assert SequenceSample.turn_blocks(conv) == single_turns(QA_TURNS)
    enc = ConversationEncoder(text_tok, image_positions=16, max_length=512)
    alone = [enc.encode(c) for c in single_turns(QA_TURNS)]
    packed = enc.encode_blocks(single_turns(QA_TURNS))
    P = int(np.flatnonzero(packed.kind == UND)[-1]) + 1
    assert (packed.block[:P] == 0).all() and (packed.position[:P] == np.arange(P)).all()
    for k, e in enumerate(alone, 1):
        rows = packed.block == k
        assert np.array_equal(packed.input_ids[rows], e.input_ids[P:]) and np.array_equal(packed.targets[rows], e.targets[P:])
        assert np.array_equal(packed.position[rows], np.arange(P, len(e.input_ids)))
    assert len(packed.input_ids) == P + sum(len(e.input_ids) - P for e in alone)
    m = [len(e.input_ids) - P for e in alone]  # each block's length
    long = 1  # room for every block but the long description: it is left out, the block after it kept
    assert m[1] > m[2]
    cut = ConversationEncoder(text_tok, 16, max_length=P + sum(m) - m[long]).encode_blocks(single_turns(QA_TURNS))
    assert sorted(set(cut.block.tolist())) == [0] + [k + 1 for k in range(3) if k != long]
    with pytest.raises(SampleError, match="no turn fits"):
        ConversationEncoder(text_tok, 16, max_length=P + 2).encode_blocks(single_turns(QA_TURNS))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_turn_blocks_train_each_turn_as_if_alone(evo, text_tok, attn):
    """A packed sample's loss and gradient are those of its single-turn conversations run one by one (each
    answer sees the image and its own question only), in a padded batch next to a plain generation row."""
    from llm.batch import collate_sequences

    model = build(evo, text_tok, "qwen2").double().train()
    model.llm.config._attn_implementation = attn
    enc = ConversationEncoder(text_tok, model.image_positions, 512)
    torch.manual_seed(4)
    codes = [torch.randint(0, 64, (4, 4, 6)).numpy() for _ in range(3)]

    def sample(key, e, c):
        s = {"__key__": key, "input_ids": e.input_ids, "targets": e.targets, "kind": e.kind, "codes": c}
        return s if e.block is None else {**s, "block": e.block, "position": e.position}

    def run(samples):
        b = collate_sequences(samples, 0)
        gen, und = (b["kind"] == GEN).any(1), (b["kind"] == UND).any(1)
        kw = {"block": b["block"], "position_ids": b["position"]} if "block" in b else {}
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], targets=b["targets"], kind=b["kind"],
                    und_feats=evo.semantic_features(b["codes"][und]).double(),
                    gen_codes=b["codes"][gen][..., :3].flatten(1, 2), **kw)
        model.zero_grad()
        (out["text_loss"] * out["text_tokens"] + out["image_loss"] * out["image_codes"]).backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    packed = [sample("a", enc.encode_blocks(single_turns(QA_TURNS)), codes[0]),
              sample("b", enc.encode_blocks(single_turns(QA_TURNS[2:])), codes[1]), sample("g", enc.encode(GEN_CONV), codes[2])]
    alone = [sample(f"a{i}", enc.encode(c), codes[0]) for i, c in enumerate(single_turns(QA_TURNS))]
    alone += [sample("b0", enc.encode(single_turns(QA_TURNS[2:])[0]), codes[1]), sample("g", enc.encode(GEN_CONV), codes[2])]
    (p_out, p_grads), (a_out, a_grads) = run(packed), run(alone)
    assert int(p_out["text_tokens"]) == int(a_out["text_tokens"]) > 0
    tol = {} if attn == "sdpa" else {"rtol": 1e-5, "atol": 1e-6}  # eager's softmax runs in float32
    for k in ("text_loss", "image_loss"):
        torch.testing.assert_close(p_out[k], a_out[k], **tol)
    for g_p, g_a in zip(p_grads, a_grads):
        torch.testing.assert_close(g_p, g_a, **tol)
