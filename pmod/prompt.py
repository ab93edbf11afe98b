"""The conversation template and ``<image>`` handling, one copy for every backend.

The released LLaVA-1.5/NeXT Vicuna checkpoints (p-MoD's included) were trained with
the Vicuna v1 template (official ``conv_vicuna_v1``): the system line, then
``USER: <msg> ASSISTANT: <reply></s>`` turns separated by a space and ``</s>``. An
image in a message is written ``<image>``; a message with images and no marker gets
``<image>\\n`` in front, as the official code does.

Token ids are produced the official way (``tokenizer_image_token``): the text is split at
each ``<image>``, every piece is tokenized on its own (BOS only on the first), and an
image slot is put between pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmod.errors import PmodError

IMAGE = "<image>"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = {"user": "USER", "assistant": "ASSISTANT"}
SEP, SEP2 = " ", "</s>"


@dataclass
class Message:
    role: str  # "user" or "assistant"
    text: str
    n_images: int = 0

    def rendered_text(self) -> str:
        markers = self.text.count(IMAGE)
        if self.n_images and markers == 0:
            return (IMAGE + "\n") * self.n_images + self.text
        if markers != self.n_images:
            raise PmodError(
                f"the message has {markers} <image> marker(s) but {self.n_images} image(s): "
                "give one image per marker")
        return self.text


def user_turn(message: Message) -> str:
    """``USER: <msg> ASSISTANT:``: a user message and the cue for the reply."""
    return f"{ROLES['user']}: {message.rendered_text()}{SEP}{ROLES['assistant']}:"


def assistant_reply(text: str) -> str:
    return f" {text}{SEP2}"


def render(messages: list[Message], system: str = SYSTEM) -> str:
    """A whole conversation ending with a user message, ready for the assistant's reply.

    A chat that keeps its caches appends ``</s>`` + :func:`user_turn` per later turn, which
    gives the same text: the reply it generated is already in the context.
    """
    if not messages or messages[-1].role != "user":
        raise PmodError("the conversation must end with a user message")
    out = system + SEP
    for m in messages:
        if m.role not in ROLES:
            raise PmodError(f"unknown role {m.role!r}: use one of {', '.join(ROLES)}")
        out += user_turn(m) if m.role == "user" else assistant_reply(m.text)
    return out


def render_chat_template(tokenizer, messages: list[Message], system: str | None = None) -> str:
    """Render with the checkpoint's own chat template (``--chat-template``), images as ``<image>``.

    Images become ``{"type": "image"}`` content parts in front of the text, which the
    llava-hf templates write as ``<image>``; the text is then tokenized like any prompt.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise PmodError("the checkpoint has no chat template (chat_template.jinja / tokenizer_config.json); "
                        "drop --chat-template to use the Vicuna v1 template")
    chat = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for m in messages:
        if m.role not in ROLES:
            raise PmodError(f"unknown role {m.role!r}: use one of {', '.join(ROLES)}")
        text = m.text
        markers = text.count(IMAGE)
        if markers and markers != m.n_images:
            raise PmodError(f"the message has {markers} <image> marker(s) but {m.n_images} image(s): "
                            "give one image per marker")
        parts = [] if markers else [{"type": "image"}] * m.n_images
        chat.append({"role": m.role, "content": parts + [{"type": "text", "text": text}]})
    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template that cannot render these messages
        raise PmodError(f"the checkpoint's chat template failed: {type(e).__name__}: {e}".split("\n")[0]) from None


def render_dialogue(messages: list[Message], system: str = SYSTEM) -> tuple[str, list[tuple[int, int]]]:
    """A conversation whose assistant replies are included, and the replies' character spans.

    The text is what :func:`render` + the generated replies put in the context, so a model
    trained on it sees exactly what it sees at inference; the spans (each reply and its
    ``</s>``) are where the training loss goes.
    """
    if not messages or messages[-1].role != "assistant":
        raise PmodError("a training conversation must end with an assistant message")
    out, spans = system + SEP, []
    for m in messages:
        if m.role == "user":
            out += user_turn(m)
        elif m.role == "assistant":
            start = len(out)  # the leading space too: SentencePiece-style tokens carry it
            out += assistant_reply(m.text)
            spans.append((start, len(out)))
        else:
            raise PmodError(f"unknown role {m.role!r}: use one of {', '.join(ROLES)}")
    return out, spans


def tokenize_dialogue(tokenizer, messages: list[Message], system: str = SYSTEM) -> tuple[list, np.ndarray]:
    """Token ids (``None`` at image slots) and a loss mask marking the assistant replies' tokens."""
    text, spans = render_dialogue(messages, system)
    tokens: list = []
    mask: list[bool] = []
    base = 0
    bos = tokenizer.bos_token_id
    for i, piece in enumerate(text.split(IMAGE)):
        enc = tokenizer(piece, return_offsets_mapping=True, verbose=False)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if bos is not None and ids[:1] == [bos] and i > 0:
            ids, offsets = ids[1:], offsets[1:]
        if i > 0:
            tokens.append(None)
            mask.append(False)
        for t, (a, b) in zip(ids, offsets):
            tokens.append(t)
            start = base + a
            mask.append(b > a and any(s <= start < e for s, e in spans))
        base += len(piece) + len(IMAGE)
    return tokens, np.asarray(mask, dtype=bool)


def tokenize(tokenizer, text: str, add_bos: bool = True) -> list:
    """Token ids with ``None`` at each ``<image>`` slot (official ``tokenizer_image_token``)."""
    pieces = text.split(IMAGE)
    out: list = []
    bos = tokenizer.bos_token_id
    for i, piece in enumerate(pieces):
        ids = list(tokenizer(piece, verbose=False)["input_ids"])
        if bos is not None and ids[:1] == [bos] and (i > 0 or not add_bos):
            ids = ids[1:]
        if i > 0:
            out.append(None)
        out.extend(ids)
    return out


def split_segments(tokens: list) -> list:
    """[int, ..., None, int, ...] -> [np.ndarray ids | None (an image), ...], empty runs dropped."""
    segments, run = [], []
    for t in tokens:
        if t is None:
            if run:
                segments.append(np.asarray(run, dtype=np.int32))
                run = []
            segments.append(None)
        else:
            run.append(t)
    if run:
        segments.append(np.asarray(run, dtype=np.int32))
    return segments
