"""Stage 3 (instruction tuning): conversation building, the assistant-only loss mask token by token (with text
after a generated image), init_from errors, full fine-tuning in-process, and LoRA under deepspeed ZeRO-2 on two
ranks mixing shapes shards with shards built from a LLaVA JSON, whose merged export reloads in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import stage3  # launch/ is on pytest's pythonpath
import torch
from conftest import deepspeed_launch
from PIL import Image
from safetensors.torch import load_file

from data.build_shards import build
from data.config import ImageConfig
from data.corpus import corpus
from data.schema import SampleError
from data.shapes import render_scene, scene_record
from data.shapes_cli import DatasetConfig, write_dataset
from data.shapes_config import preset as shapes_preset
from llm.config import preset as unified_preset
from llm.conversation import GEN, IGNORE, UND, ConversationEncoder
from llm.model import UnifiedModel, build_unified
from llm.text_tokenizer import IMAGE_TOKEN, load_text_tokenizer, train_text_tokenizer
from tokenizer.config import preset as tokenizer_preset
from tokenizer.model import EvoTokenizer
from unimllm.errors import ArtifactError
from unimllm.stages.artifacts import tokenizer_reference
from unimllm.stages.instruct_stage import InstructionSample, InstructMixConfig
from unimllm.stages.precompute_codes import precompute

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.batch_size", "4", "--mix.group_batches", "2", "--mix.max_length", "256", "--val.max_questions", "8",
         "--val.max_prompts", "6", "--val.batch_size", "8", "--val.grid_images", "4", "--train.log_every", "1",
         "--train.threads", "1", "--run.wandb_mode", "disabled"]
LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Shapes shards + codes, a small tokenizer, a (random-init) tiny stage-2 export with its BPE text tokenizer,
    and shards + codes built from a LLaVA JSON (an understanding and a draw-then-ask conversation per image)."""
    out = tmp_path_factory.mktemp("world")
    write_dataset(DatasetConfig(out=str(out / "shapes"), n=32, n_val=8, shard_size=16, workers=0, geneval_per_tag=1),
                  log=lambda *_: None)
    cfg = tokenizer_preset("tiny")
    cfg.pixel_decoder.channels, cfg.pixel_decoder.z_channels = 16, 16
    cfg.quantizer.codebook_size = 64
    tok = EvoTokenizer(cfg, with_teacher=False)
    tok.save_pretrained(out / "tok")
    precompute(out / "tok", str(out / "shapes/train/shapes-train-{000000..000001}.tar"), out / "codes")
    text_tok = train_text_tokenizer(corpus([str(p) for p in sorted((out / "shapes/train").glob("*.tar"))]), 300)
    ucfg = unified_preset("tiny")
    ucfg.tokenizer = str(out / "tok")
    ucfg.llm.hidden_size, ucfg.llm.num_layers, ucfg.llm.intermediate_size = 32, 2, 64
    ucfg.depth.width, ucfg.depth.layers = 32, 1
    torch.manual_seed(0)
    build_unified(ucfg, text_tok, [], tok).save_pretrained(out / "stage2", tokenizer_ref=tokenizer_reference(out / "tok"),
                                                           text_tokenizer=text_tok)
    (out / "llava/images").mkdir(parents=True)
    records = []
    for i in range(4):
        scene = render_scene(shapes_preset("demo"), "train", 1000 + i)
        Image.fromarray(scene.image).save(out / f"llava/images/{i}.png")
        qa = next(iter(scene.record["mme"].values()))[0]
        records += [{"id": f"und-{i}", "image": f"{i}.png", "conversations": [
                        {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat is in the picture?"},
                        {"from": "gpt", "value": scene.record["caption"]},
                        {"from": "human", "value": qa["question"]}, {"from": "gpt", "value": qa["answer"]}]},
                    {"id": f"gen-{i}", "image": f"{i}.png", "conversations": [
                        {"from": "human", "value": f"Draw {scene.record['prompt']}."},
                        {"from": "gpt", "value": IMAGE_TOKEN},
                        {"from": "human", "value": qa["question"]}, {"from": "gpt", "value": qa["answer"]}]}]
    (out / "llava/llava.json").write_text(json.dumps(records))
    summary = build(out / "llava/llava.json", out / "llava/shards/llava-%06d.tar", image_root=out / "llava/images")
    assert summary.samples == 8 and not summary.skipped
    precompute(out / "tok", str(out / "llava/shards/llava-000000.tar"), out / "llava/codes")
    return out


def args(world: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "launch/configs/stage3/tiny.yaml"), *SMALL, "--init_from", str(world / "stage2"),
            "--data.sources.0.shards", str(world / "codes/shapes-train-{000000..000001}.tar"),
            "--val.shards", str(world / "shapes/val/shapes-val-000000.tar"),
            "--val.geneval_prompts", str(world / "shapes/val/geneval_prompts.jsonl"),
            "--train.steps", str(steps), "--run.out_dir", str(out), *extra]


# ----------------------------------------------------------------------------- conversations


def test_instruction_conversations_follow_the_mode_weights_and_the_record():
    rec = scene_record(shapes_preset("demo"), "train", 3)
    qa = {(q["question"], q["answer"]) for pairs in rec["mme"].values() for q in pairs}
    sample = InstructionSample(None, InstructMixConfig(understanding=1, generation=2, mixed=1), ImageConfig(), True)
    draw = lambda s, r, n: [s.conversation(r, np.random.default_rng([7, i])) for i in range(n)]  # noqa: E731
    convs = draw(sample, rec, 400)
    assert convs == draw(sample, rec, 400)  # a function of the seed
    kinds = Counter("understanding" if IMAGE_TOKEN in c[0]["value"] else "generation" if len(c) == 2 else "mixed"
                    for c in convs)
    assert abs(kinds["generation"] / 400 - 0.5) < 0.08 and abs(kinds["mixed"] / 400 - 0.25) < 0.08
    for c in convs:
        if IMAGE_TOKEN in c[0]["value"]:
            assert c == rec["conversations"]  # understanding: the record's own multi-turn conversation
            continue
        assert c[1] == {"from": "gpt", "value": IMAGE_TOKEN}
        follow = [(c[i]["value"], c[i + 1]["value"]) for i in range(2, len(c), 2)]
        assert 0 <= len(follow) <= 2 and set(follow) <= qa and len(set(follow)) == len(follow)
    asks = {c[0]["value"] for c in convs if IMAGE_TOKEN not in c[0]["value"]}
    subject = rec["prompt"].removeprefix("a photo of ")
    assert {rec["prompt"], f"Draw {subject}.", f"Can you make a picture of {subject}?",
            f"Draw this: {rec['caption']}", ""} <= asks
    only_und = InstructionSample(None, InstructMixConfig(generation=0, mixed=0), ImageConfig(), True)
    assert all(c == rec["conversations"] for c in draw(only_und, rec, 20))
    blocks = InstructionSample(None, InstructMixConfig(generation=0, mixed=0, independent_turns=True), ImageConfig(), True)
    assert draw(blocks, rec, 1)[0] == InstructionSample.turn_blocks(rec["conversations"])  # one conversation per turn
    no_mme = InstructionSample(None, InstructMixConfig(understanding=0, generation=0), ImageConfig(), True)
    with pytest.raises(SampleError, match="no <image> conversation"):
        no_mme.conversation({k: v for k, v in rec.items() if k != "mme"}, np.random.default_rng(0))


def test_loss_mask_covers_only_assistant_turns_token_by_token(world):
    """Hand-written draw-then-ask conversation through the real tiny text tokenizer: targets on assistant tokens
    only (none on prompts or image slots), and answers after the generated image learn from that image."""
    text_tok, _ = load_text_tokenizer(world / "stage2/text_tokenizer", "test")
    model = UnifiedModel.from_pretrained(world / "stage2")
    N = model.image_positions
    enc = ConversationEncoder(text_tok, N, max_length=4096).encode([
        {"from": "human", "value": "Draw a red circle left of a blue square."}, {"from": "gpt", "value": IMAGE_TOKEN},
        {"from": "human", "value": "Is there a blue square? Please answer yes or no."}, {"from": "gpt", "value": "Yes"},
        {"from": "human", "value": "How many circles are there?"}, {"from": "gpt", "value": "One."}])
    pieces = [  # (text, assistant?) exactly as the tiny chat template renders the conversation
        ("<|im_start|>user\nDraw a red circle left of a blue square.<|im_end|>\n<|im_start|>assistant\n", False),
        ("<im_start>", True), (IMAGE_TOKEN, None), ("<im_end><|im_end|>\n", True),
        ("<|im_start|>user\nIs there a blue square? Please answer yes or no.<|im_end|>\n<|im_start|>assistant\n", False),
        ("Yes<|im_end|>\n", True),
        ("<|im_start|>user\nHow many circles are there?<|im_end|>\n<|im_start|>assistant\n", False),
        ("One.<|im_end|>\n", True)]
    ids, labeled, kind, piece = [], [], [], []
    for j, (text, reply) in enumerate(pieces):
        t = text_tok(text, add_special_tokens=False)["input_ids"]
        n = N if reply is None else len(t)
        ids += t * N if reply is None else t
        labeled += [bool(reply)] * n
        kind += [GEN if reply is None else 0] * n
        piece += [j] * n
    assert enc.input_ids.tolist() == ids and enc.kind.tolist() == kind
    want = [ids[t + 1] if labeled[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    assert enc.targets.tolist() == want  # token by token
    got = text_tok.decode(enc.targets[enc.targets != IGNORE].tolist(), skip_special_tokens=False)
    assert got == "<im_start><im_end><|im_end|>\nYes<|im_end|>\nOne.<|im_end|>\n"
    last_slot = int(np.flatnonzero(enc.kind == GEN)[-1])
    assert (enc.targets[last_slot + 1:] != IGNORE).sum() > 3  # text targets after the generation image

    # The model: text loss on exactly these tokens; the answer after the image is conditioned on its codes.
    answer = np.array([t + 1 < len(ids) and piece[t + 1] == 5 for t in range(len(ids))])  # targets "Yes<|im_end|>\n"
    batch = {"input_ids": torch.from_numpy(enc.input_ids)[None], "kind": torch.from_numpy(enc.kind.astype(np.int64))[None],
             "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "gen_codes": torch.randint(0, model.dims.codebook_size, (1, N, model.dims.depth_pix))}
    out = model(**batch, targets=torch.from_numpy(enc.targets)[None])
    assert int(out["text_tokens"]) == int((enc.targets != IGNORE).sum()) and torch.isfinite(out["loss"])
    only_answer = torch.from_numpy(np.where(answer, enc.targets, IGNORE))[None]
    model(**batch, targets=only_answer)["text_loss"].backward()
    assert model.gen_projector.net[0].weight.grad.abs().sum() > 0  # the drawn image's slots feed the answer
    assert model.und_projector.net[0].weight.grad is None or not model.und_projector.net[0].weight.grad.any()
    assert not (enc.kind == UND).any()


# ----------------------------------------------------------------------------- errors


def test_init_from_missing_or_not_an_export_is_named(world, tmp_path, capsys):
    base = [a for a in args(world, tmp_path / "run", 1) if a != str(world / "stage2")]
    i = base.index("--init_from")
    with pytest.raises(SystemExit) as e:
        stage3.main(base[:i] + base[i + 1:] + ["--init_from", ""])
    assert e.value.code == 2 and "init_from: set the stage-2 export directory" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match=r"init_from: .*missing does not exist"):
        stage3.main(base[:i] + base[i + 1:] + ["--init_from", str(tmp_path / "missing")])
    with pytest.raises(ArtifactError, match="is a stage-1 tokenizer export .*; init_from needs a unified export"):
        stage3.main(base[:i] + base[i + 1:] + ["--init_from", str(world / "tok")])  # a stage-1 export


# ----------------------------------------------------------------------------- end to end


def test_stage3_full_finetuning_in_process(world, tmp_path):
    out = tmp_path / "full"
    final = stage3.main(args(world, out, 2))
    assert 0 <= final["val/followup_yes_no_acc"] <= 1 and final["val/questions"] == 8
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "train/loss" in r]) == 2
    export = out / "export/unified"
    assert {"unified_config.json", "heads.safetensors", "llm", "text_tokenizer"} <= {p.name for p in export.iterdir()}
    new, old = load_file(export / "llm/model.safetensors"), load_file(world / "stage2/llm/model.safetensors")
    assert new.keys() == old.keys() and not torch.equal(new["model.embed_tokens.weight"], old["model.embed_tokens.weight"])
    meta = json.loads((export / "unified_config.json").read_text())
    assert meta["tokenizer"]["path"] == str((world / "tok").resolve())


def test_stage3_lora_resumes_exactly(world, tmp_path):
    """LoRA dropout draws from the torch RNG: a resumed run continues with the same draws and adapter states."""
    def losses(out: Path, steps: int) -> list[float]:
        stage3.main(args(world, out, steps, "--tune.method", "lora", "--tune.lora.rank", "4", "--optim.lr", "0.01",
                         "--val.shards", "", "--val.geneval_prompts", ""))
        return [json.loads(x)["train/loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]

    full = losses(tmp_path / "full", 4)
    losses(tmp_path / "part", 2)
    assert losses(tmp_path / "part", 4) == full


@pytest.mark.slow
def test_stage3_lora_deepspeed_zero2_merged_export_reloads_in_a_fresh_process(world, tmp_path):
    out = tmp_path / "lora"
    sources = (f"[{{shards: '{world}/codes/shapes-train-{{000000..000001}}.tar', name: shapes}}, "
               f"{{shards: '{world}/llava/codes/llava-000000.tar', name: llava, weight: 2}}]")
    deepspeed_launch(ROOT / "launch/stage3.py", args(world, out, 3, "--train.zero_stage", "2", "--tune.method", "lora",
                                                     "--tune.lora.rank", "4", "--tune.lora.alpha", "8",
                                                     "--tune.lora.target_modules", ",".join(LORA),
                                                     "--optim.lr", "0.01", "--data.sources", sources), 29641)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "train/loss" in r]) == 3 and any("val/followup_yes_no_acc" in r for r in rows)
    export = out / "export/unified"
    new, old = load_file(export / "llm/model.safetensors"), load_file(world / "stage2/llm/model.safetensors")
    heads, heads0 = load_file(export / "heads.safetensors"), load_file(world / "stage2/heads.safetensors")
    assert new.keys() == old.keys() and heads.keys() == heads0.keys()  # plain HF + heads: no lora_ tensors left
    assert not any("lora" in k for k in [*new, *heads])
    targeted = [k for k in new if k.endswith(".weight") and k.split(".")[-2] in LORA]
    assert targeted and all(not torch.equal(new[k], old[k]) for k in targeted)  # merged updates
    assert all(torch.equal(new[k], old[k]) for k in new if k not in targeted)  # the rest of the LLM stays frozen
    for part in ("depth.", "gen_projector.", "und_projector."):  # the heads train too
        assert any(not torch.equal(v, heads0[k]) for k, v in heads.items() if k.startswith(part)), part
    code = (
        "import json, sys\n"
        "from unimllm.stages.pipeline import UnifiedPipeline\n"
        "pipe = UnifiedPipeline.from_pretrained(sys.argv[1])\n"
        "imgs = pipe.generate_image(['Draw a red circle.'], seed=0)\n"
        "ans = pipe.answer(imgs, ['Is there a red circle in the image? Please answer yes or no.'], max_new_tokens=4)\n"
        "print(json.dumps({'shape': list(imgs[0].shape), 'answer': ans}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(export)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["shape"] == [64, 64, 3] and isinstance(got["answer"][0], str)
