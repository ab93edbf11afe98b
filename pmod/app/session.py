"""A conversation over any engine: template, images, streaming, caches kept across turns.

``pmod generate``, ``pmod chat`` and ``pmod server`` are written on this one class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from pmod import prompt
from pmod.engine import Engine
from pmod.errors import PmodError
from pmod.app.generate import GenerationStats, Sampler, SamplerArgs, generate_tokens
from pmod.app.registry import open_engine
from pmod.tokenizer import StreamingDetokenizer, load_tokenizer


@dataclass
class Reply:
    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)


class Session:
    def __init__(self, engine: Engine, model_dir: str | Path, tokenizer=None, chat_template: bool = False):
        """``chat_template``: render prompts with the checkpoint's own chat template instead of
        Vicuna v1; a chat then re-reads the whole conversation each turn (the template's
        turn boundaries are not known to pmod, so no cached prefix is assumed)."""
        self.engine = engine
        self.chat_template = chat_template
        self.config = engine.config
        self.model_dir = Path(model_dir)
        self.tokenizer = tokenizer or load_tokenizer(model_dir)
        self._processor = None
        self.eos_ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.turns = 0
        self.history: list[tuple[prompt.Message, list]] = []  # (message, its images), --chat-template only
        self.image_positions: list[np.ndarray] = []
        self._unfed: int | None = None  # the last reply's final token, when not yet in the context

    def reset(self) -> None:
        self.engine.reset()
        self.turns = 0
        self.history = []
        self._unfed = None

    def render(self, messages: list[prompt.Message], system: str | None = None) -> str:
        if self.chat_template:
            return prompt.render_chat_template(self.tokenizer, messages, system)
        return prompt.render(messages, system=prompt.SYSTEM if system is None else system)

    # ------------------------------------------------------------------ inputs
    @property
    def processor(self):
        """Image preprocessing settings, read on the first image."""
        from pmod.image import ImageProcessorConfig

        if self.config.vision_config is None:
            raise PmodError(
                f"{self.model_dir} has no vision tower, so it cannot take images: re-convert it with "
                "'pmod convert SRC DST --vision-tower CLIP_DIR'")
        if self._processor is None:
            self._processor = ImageProcessorConfig.for_model(self.config, self.model_dir)
        return self._processor

    def encode(self, text: str, images=(), add_bos: bool = True) -> dict:
        """Prefill arguments for ``text`` whose ``<image>`` markers are filled by ``images``."""
        from pmod.image import preprocess

        segments = prompt.split_segments(prompt.tokenize(self.tokenizer, text, add_bos=add_bos))
        self.image_positions = []  # per image of this chunk: its tokens' positions in the chunk
        if not images:
            return dict(input_ids=segments[0] if segments else np.zeros(0, np.int32))
        processor = self.processor
        inputs = [preprocess(img, self.config, processor) for img in images]
        n_tokens = sum(len(s) for s in segments if s is not None) + sum(i.num_tokens for i in inputs)
        self.engine.check_room(n_tokens)  # before the (costly) vision tower runs
        embeds, masks, it, t = [], [], iter(inputs), 0
        for seg in segments:
            if seg is None:
                image = next(it)
                self.image_positions.append(np.arange(t, t + image.num_tokens))
                embeds.append(self.engine.encode_image(image))
                masks.append(image.routed_mask(self.config.mod_target_token_type))
            else:
                embeds.append(self.engine.embed(seg))
                masks.append(np.zeros(len(seg), dtype=bool))
            t += len(masks[-1])
        return dict(inputs_embeds=np.concatenate(embeds), vision_mask=np.concatenate(masks))

    # ---------------------------------------------------------------- generate
    def ask(self, text: str, images=(), **kwargs) -> Iterator[str]:
        """Stream the reply to one more user message; earlier turns stay in the caches."""
        message = prompt.Message("user", text, len(images))
        if self.chat_template:
            return self._ask_templated(message, list(images), **kwargs)
        if self.turns == 0:
            turn = prompt.SYSTEM + prompt.SEP + prompt.user_turn(message)
        else:  # the last reply's </s> was sampled, not fed: it opens this turn
            turn = prompt.SEP2 + prompt.user_turn(message)
        inputs = self.encode(turn, images, add_bos=self.turns == 0)
        if self._unfed is not None:
            inputs = self._prepend(self._unfed, inputs)
        self.turns += 1
        return self._stream(inputs, **kwargs)

    def _ask_templated(self, message: prompt.Message, images: list, reply: Reply | None = None,
                       **kwargs) -> Iterator[str]:
        history = self.history + [(message, images)]
        messages = [m for m, _ in history]
        all_images = [img for _, imgs in history for img in imgs]
        self.engine.reset()
        self._unfed = None
        inputs = self.encode(self.render(messages), all_images)
        reply = reply if reply is not None else Reply()
        yield from self._stream(inputs, reply=reply, **kwargs)
        self.turns += 1
        self.history = history + [(prompt.Message("assistant", reply.text), [])]

    def _prepend(self, token: int, inputs: dict) -> dict:
        ids = np.asarray([token], np.int32)
        if "input_ids" in inputs:
            return dict(input_ids=np.concatenate([ids, inputs["input_ids"]]))
        return dict(inputs_embeds=np.concatenate([self.engine.embed(ids), inputs["inputs_embeds"]]),
                    vision_mask=np.concatenate([[False], inputs["vision_mask"]]))

    def complete(self, messages: list[prompt.Message], images=(), system: str | None = None,
                 **kwargs) -> Iterator[str]:
        """Stream the reply to a whole conversation, from an empty context."""
        self.reset()
        inputs = self.encode(self.render(messages, system), images)
        self.turns = 1
        return self._stream(inputs, **kwargs)

    def _stream(self, inputs: dict, max_tokens: int = 256, sampler: Sampler | None = None,
                stop: list[str] | None = None, reply: Reply | None = None) -> Iterator[str]:
        """Yield the reply's text; with ``stop`` strings, text that could begin one is held
        back until it is clear, and the reply ends before the first match."""
        reply = reply if reply is not None else Reply()
        detok = StreamingDetokenizer(self.tokenizer)
        stops = [s for s in (stop or []) if s]
        tokens = generate_tokens(self.engine, max_tokens=max_tokens, sampler=sampler or Sampler(SamplerArgs()),
                                 eos_ids=self.eos_ids, stats=reply.stats, **inputs)
        text, sent = "", 0  # everything decoded; how much of it was yielded

        def release(final: bool) -> tuple[str, bool]:
            """(new text safe to yield, whether a stop string matched)."""
            nonlocal sent
            hits = [h for h in (text.find(s) for s in stops) if h >= 0]
            end = min(hits) if hits else len(text)
            if not hits and not final:  # hold back a tail that may begin a stop string
                for s in stops:
                    n = next((n for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), 0)
                    end = min(end, len(text) - n)
            piece, sent = text[sent:end], max(sent, end)
            reply.text = text[:sent]
            if hits:
                reply.stats.finish_reason = "stop"
            return piece, bool(hits)

        try:
            for token in tokens:
                text += detok.add(token)
                piece, stopped = release(final=False)
                if piece:
                    yield piece
                if stopped:
                    return
            text += detok.finish()
            piece, _ = release(final=True)
            if piece:
                yield piece
        finally:  # also when the consumer stops reading (a client gone)
            tokens.close()
            self._unfed = reply.stats.unfed_token


def open_session(model_dir, backend: str = "mlx", dtype: str | None = None, chat_template: bool = False,
                 **kwargs) -> Session:
    tokenizer = load_tokenizer(model_dir)  # checked before the (slower) weights load
    return Session(open_engine(model_dir, backend=backend, dtype=dtype, **kwargs), model_dir, tokenizer,
                   chat_template=chat_template)


def session_from_args(args) -> Session:
    """The session a command's flags ask for (``--model --backend --dtype --adapter-path --chat-template
    --retention --device``)."""
    kwargs = {}
    if getattr(args, "adapter_path", None):
        kwargs["adapter_path"] = args.adapter_path
    if getattr(args, "retention", None) is not None:
        kwargs["retention"] = args.retention
    if getattr(args, "device", None) is not None:
        kwargs["device"] = args.device
    return open_session(args.model, backend=args.backend, dtype=args.dtype,
                        chat_template=getattr(args, "chat_template", False), **kwargs)
