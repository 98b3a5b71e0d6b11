"""Conversations -> token ids, next-token targets and image slots, through the text tokenizer's chat template.

A conversation is LLaVA-style ``[{"from": "human"|"gpt"|"system", "value": str}, ...]`` with ``<image>``
where the image stands:
  * in a human turn: an **understanding** image. ``<image>`` expands to N slots (kind 1) whose embeddings
    the model replaces with projected semantic-decoder features;
  * in a gpt turn: a **generation** image, rendered ``<im_start><image><im_end>``; ``<image>`` expands to N
    slots (kind 2) whose embeddings are gen_projector(sum of that position's L_pix code embeddings).

Targets are aligned to inputs: ``targets[t]`` is the token position t must predict (``ids[t + 1]``) when
that token belongs to an assistant reply (text, ``<im_start>``, ``<im_end>``, the end-of-turn token), else
-100. Prompts (system, user, assistant headers) and image slots are never text targets; the codes of
generation slot t + 1 are predicted from position t by the depth transformer.

Turns are located by rendering the chat template on growing prefixes of the conversation, so any HF
template that renders prefixes as prefixes (Qwen2.5, Llama-3, the tiny template) works; one that does
not is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm.text_tokenizer import IM_END, IM_START, IMAGE_TOKEN
from unimllm.errors import SampleError

IGNORE = -100
TEXT, UND, GEN = 0, 1, 2
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TOO_LONG, BAD_CONVERSATION = "too_long", "bad_conversation"


@dataclass
class Encoded:
    """One training sequence."""

    input_ids: np.ndarray
    """(T,) int64 token ids (image slots hold the ``<image>`` id)."""
    targets: np.ndarray
    """(T,) int64 next-token targets, IGNORE where position t has no text target."""
    kind: np.ndarray
    """(T,) int8: TEXT, UND (understanding slot) or GEN (generation slot)."""
    block: np.ndarray | None = None
    """(T,) int64 attention blocks of a packed sample (``encode_blocks``): 0 = the shared prefix every token
    sees, k > 0 = the k-th turn, seen only by its own tokens; None = one plain causal sequence."""
    position: np.ndarray | None = None
    """(T,) int64 position ids (every block continues from the prefix); None = 0..T-1."""

    @property
    def direction(self) -> str:
        return "generation" if (self.kind == GEN).any() else "understanding"


def to_messages(conversation: list[dict], *, reply_next: bool = False) -> list[dict]:
    """LLaVA ``from``/``value`` turns -> chat-template ``role``/``content`` messages (generation turns wrapped).
    A training conversation ends with the assistant's turn; with ``reply_next`` it ends before it."""
    if not isinstance(conversation, list) or not conversation:
        raise SampleError(BAD_CONVERSATION, "conversations must be a non-empty list")
    out = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise SampleError(BAD_CONVERSATION, f"turn {i}: need from in {sorted(ROLES)} and a string value")
        role, text = ROLES[turn["from"]], turn["value"]
        if role == "assistant":
            text = text.replace(IMAGE_TOKEN, IM_START + IMAGE_TOKEN + IM_END)
        out.append({"role": role, "content": text})
    if (out[-1]["role"] == "assistant") == reply_next:
        raise SampleError(BAD_CONVERSATION, "the last turn must be the user's (a reply comes next)" if reply_next
                          else "the last turn must be the assistant's")
    return out


class ConversationEncoder:
    """Encode conversations for one text tokenizer and image size (N positions per image)."""

    def __init__(self, text_tokenizer, image_positions: int, max_length: int = 2048):
        self.tok, self.n, self.max_length = text_tokenizer, image_positions, max_length
        self.image_id = text_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.im_start_id = text_tokenizer.convert_tokens_to_ids(IM_START)

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """(text, is_assistant_reply) pieces whose concatenation is the rendered conversation."""
        out, prev = [], ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self._render(messages[:i], generation_prompt=True) if i else ""
                full = self._render(messages[: i + 1])
                if not head.startswith(prev) or not full.startswith(head):
                    raise ValueError("the chat template does not render conversation prefixes as prefixes")
                out += [(head[len(prev):], False), (full[len(head):], True)]
            else:
                full = self._render(messages[: i + 1])
                if not full.startswith(prev):
                    raise ValueError("the chat template does not render conversation prefixes as prefixes")
                out.append((full[len(prev):], False))
            prev = full
        return [(s, a) for s, a in out if s]

    def encode(self, conversation: list[dict], *, cut: bool = True) -> Encoded:
        """Token ids, targets and slot kinds, cut to ``max_length`` (unless ``cut`` is off); SampleError(too_long)
        if the cut would fall in or before an image."""
        ids, labeled, kind = [], [], []
        n_images = 0
        for text, reply in self.segments(to_messages(conversation)):
            for t in self._ids(text):
                if t == self.image_id:
                    n_images += 1
                    ids += [t] * self.n
                    labeled += [False] * self.n
                    kind += [GEN if reply else UND] * self.n
                else:
                    ids.append(t)
                    labeled.append(reply)
                    kind.append(TEXT)
        if n_images != 1:
            raise SampleError(BAD_CONVERSATION, f"expected exactly one {IMAGE_TOKEN} (one image per sample), "
                                                f"got {n_images}")
        ids_a, kind_a = np.asarray(ids, np.int64), np.asarray(kind, np.int8)
        targets = np.full(len(ids), IGNORE, np.int64)
        lab = np.asarray(labeled, bool)
        targets[:-1][lab[1:]] = ids_a[1:][lab[1:]]
        if cut and len(ids) > self.max_length:
            last_slot = int(np.flatnonzero(kind_a != TEXT)[-1])
            if last_slot >= self.max_length:
                raise SampleError(TOO_LONG, f"{len(ids)} tokens > max_length {self.max_length} and the cut would "
                                            "fall inside an image")
            ids_a, targets, kind_a = ids_a[: self.max_length], targets[: self.max_length], kind_a[: self.max_length]
            targets[-1] = IGNORE  # its target was cut
        if not (targets != IGNORE).any() and not (kind_a == GEN).any():
            raise SampleError(BAD_CONVERSATION, "nothing to learn: no assistant text and no generated image")
        return Encoded(ids_a, targets, kind_a)

    def encode_blocks(self, conversations: list[list[dict]]) -> Encoded:
        """Single-turn conversations about one image -> one packed sequence: their shared prefix (everything
        up to and including the image slots) once, then each conversation's remainder as its own attention
        block with positions continuing from the prefix. Every block computes exactly what it would alone
        (the model masks attention by ``block``), so n questions cost one image and none sees another's
        answer. Blocks that no longer fit ``max_length`` are left out; SampleError(too_long) if none fits."""
        encs = [self.encode(c, cut=False) for c in conversations]
        if not encs:
            raise SampleError(BAD_CONVERSATION, "no turns to encode")
        P = int(np.flatnonzero(encs[0].kind != TEXT)[-1]) + 1  # prefix: through the last image slot
        for e in encs[1:]:
            if len(e.input_ids) < P or not np.array_equal(e.input_ids[:P], encs[0].input_ids[:P]) \
                    or (e.kind[P:] != TEXT).any():
                raise SampleError(BAD_CONVERSATION, "block conversations must share everything up to their image")
        parts, n = [(encs[0].input_ids[:P], encs[0].targets[:P], encs[0].kind[:P], np.zeros(P, np.int64),
                     np.arange(P))], P
        for k, e in enumerate(encs, 1):
            m = len(e.input_ids) - P
            if n + m > self.max_length:
                continue
            parts.append((e.input_ids[P:], e.targets[P:], e.kind[P:], np.full(m, k, np.int64), np.arange(P, P + m)))
            n += m
        if len(parts) == 1:
            raise SampleError(TOO_LONG, f"no turn fits max_length {self.max_length} after the {P}-token prefix")
        ids, targets, kind, block, pos = (np.concatenate(c) for c in zip(*parts))
        return Encoded(ids, targets, kind, block, pos)

    # ------------------------------------------------------------------ inference prompts
    def generation_prompt(self, prompt: str) -> list[int]:
        """Ids of ``user: prompt`` + the assistant header + ``<im_start>``: the LLM continues with positions."""
        text = self._render([{"role": "user", "content": prompt}], generation_prompt=True)
        return self._ids(text) + [self.im_start_id]

    def reply_prompt(self, conversation: list[dict]) -> tuple[list[int], np.ndarray]:
        """Ids and kinds of a conversation that ends with a user turn, + the assistant header: the model's reply
        comes next. ``<image>`` in a user turn expands to UND slots, in an assistant turn (wrapped in
        ``<im_start>``/``<im_end>``) to GEN slots."""
        messages = to_messages(conversation, reply_next=True)
        slot_kinds = [GEN if m["role"] == "assistant" else UND for m in messages
                      for _ in range(m["content"].count(IMAGE_TOKEN))]
        ids, kind = [], []
        for t in self._ids(self._render(messages, generation_prompt=True)):
            k, n = (slot_kinds.pop(0), self.n) if t == self.image_id else (TEXT, 1)
            ids += [t] * n
            kind += [k] * n
        return ids, np.asarray(kind, np.int8)

    def understanding_prompt(self, question: str) -> tuple[list[int], np.ndarray]:
        """Ids and kinds of ``user: <image>\\nquestion`` + the assistant header (image slots expanded)."""
        q = question if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n{question}"
        return self.reply_prompt([{"from": "human", "value": q}])
