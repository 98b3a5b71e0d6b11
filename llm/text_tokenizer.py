"""Text tokenizers: the image special tokens, loading a local HF tokenizer, and training a tiny one.

Special tokens (added to any tokenizer that lacks them):
  ``<image>``    where an image stands in a conversation (expanded to the image's positions);
  ``<im_start>`` / ``<im_end>`` around a generated image (the assistant turn is ``<im_start><image><im_end>``).
Image codes are never text tokens.

The ``tiny`` preset has no pretrained LLM, so stage 2 trains a byte-level BPE on the training shards'
text (captions, prompts, conversations) and saves it in Hugging Face format with a Qwen-style chat
template (``<|im_start|>role\\n...<|im_end|>\\n``, no default system prompt).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

IMAGE_TOKEN, IM_START, IM_END = "<image>", "<im_start>", "<im_end>"
IMAGE_SPECIALS = (IMAGE_TOKEN, IM_START, IM_END)
PAD, TURN_START, TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_text_tokenizer(path: str | Path, field: str, trust_remote_code: bool = False):
    """(tokenizer, tokens it lacked) for a local HF tokenizer directory, image special tokens added;
    errors name ``field``."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{field}: text tokenizer directory {p} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - re-raised with the field named
        raise ValueError(f"{field}: cannot load a tokenizer from {p}: {type(e).__name__}: {e}") from None
    added = ensure_special_tokens(tok)
    if tok.chat_template is None:
        raise ValueError(f"{field}: tokenizer at {p} has no chat template")
    return tok, added


def ensure_special_tokens(tok) -> list[str]:
    """Add the image special tokens (and a pad token) where missing; returns what was added."""
    vocab = tok.get_vocab()
    missing = [t for t in IMAGE_SPECIALS if t not in vocab]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or PAD
    return missing


def train_text_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (``tokenizers``) on ``texts`` as a PreTrainedTokenizerFast with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, TURN_START, TURN_END, *IMAGE_SPECIALS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    roles = itertools.repeat("user\nassistant\nsystem\n", 64)  # the chat template's words, as whole tokens
    bpe.train_from_iterator(itertools.chain(texts, roles), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=TURN_END, pad_token=PAD,
                                  additional_special_tokens=[TURN_START, *IMAGE_SPECIALS])
    tok.chat_template = CHAT_TEMPLATE
    return tok
