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
from pmod.app.caches import ImageUnit, PromptCache, Saved, VisionCache, check_bytes, image_key, unit_tokens
from pmod.app.generate import GenerationStats, Sampler, SamplerArgs, generate_tokens
from pmod.app.registry import open_engine
from pmod.tokenizer import StreamingDetokenizer, load_tokenizer


@dataclass
class Pending:
    """A request's prompt on its way to the conversation cache: its units, the vision groups its
    context routed (:class:`~pmod.app.caches.Saved`) and how many prompt tokens were resumed."""

    units: list
    groups: list
    resumed: int = 0


@dataclass
class Reply:
    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)


class Session:
    def __init__(self, engine: Engine, model_dir: str | Path, tokenizer=None, chat_template: bool = False,
                 prompt_cache_bytes: int = 0, vision_cache_bytes: int = 0):
        """``chat_template``: render prompts with the checkpoint's own chat template instead of
        Vicuna v1; a chat then re-reads the whole conversation each turn (the template's
        turn boundaries are not known to pmod, so no cached prefix is assumed).
        ``prompt_cache_bytes``, ``vision_cache_bytes``: the byte limits of the conversation and
        image-feature caches (:mod:`pmod.app.caches`) that :meth:`complete` uses; 0: off. The
        conversation cache needs an engine that resumes (``Engine.resumes``)."""
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
        check_bytes(prompt_cache_bytes, "prompt_cache_bytes")
        check_bytes(vision_cache_bytes, "vision_cache_bytes")
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes and engine.resumes else None
        self.vision_cache = VisionCache(vision_cache_bytes) if vision_cache_bytes else None

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
        units, inputs = self._units(text, images, add_bos)
        return self._inputs(units, inputs)

    def _units(self, text: str, images=(), add_bos: bool = True) -> tuple[list, dict]:
        """``text`` with its ``<image>`` markers filled, as units (:class:`~pmod.app.caches.Unit`), and the
        preprocessed images by key."""
        from pmod.image import preprocess

        segments = prompt.split_segments(prompt.tokenize(self.tokenizer, text, add_bos=add_bos))
        prepare = lambda img: preprocess(img, self.config, self.processor)  # noqa: E731
        cache = self.vision_cache
        inputs = [prepare(img) if cache is None else cache.prepared(img, prepare) for img in images]
        units, by_key, it = [], {}, iter(inputs)
        for seg in segments:
            if seg is None:
                image = next(it)
                key = image_key(image)
                by_key[key] = image
                units.append(ImageUnit(key, image.num_tokens))
            else:
                units.extend(int(t) for t in seg)
        return units, by_key

    def _inputs(self, units: list, images: dict) -> dict:
        """Prefill arguments for ``units`` (image features from the vision cache where it has them)."""
        self.image_positions = []  # per image of this chunk: its tokens' positions in the chunk
        if not any(isinstance(u, ImageUnit) for u in units):
            return dict(input_ids=np.asarray(units, np.int32))
        self.engine.check_room(unit_tokens(units))  # before the (costly) vision tower runs
        embeds, masks, text = [], [], []

        def flush():
            if text:
                embeds.append(self.engine.embed(np.asarray(text, np.int32)))
                masks.append(np.zeros(len(text), dtype=bool))
                text.clear()

        for u in units:
            if not isinstance(u, ImageUnit):
                text.append(u)
                continue
            flush()
            image, t = images[u.key], sum(len(m) for m in masks)
            self.image_positions.append(np.arange(t, t + u.tokens))
            encode = self.engine.encode_image
            embeds.append(self.vision_cache.features(image, encode) if self.vision_cache is not None else encode(image))
            masks.append(image.routed_mask(self.config.mod_target_token_type))
        flush()
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
        """Stream the reply to a whole conversation, as from an empty context: the conversation
        cache (where on) resumes from the longest exact prefix it holds, and keeps the result."""
        return self._stream(**self.start(messages, images, system), **kwargs)

    def start(self, messages: list[prompt.Message], images=(), system: str | None = None) -> dict:
        """Put the context where ``messages`` begin (empty, or a cached prefix); the prefill
        arguments of the rest, and the :class:`Pending` record to keep it by afterwards."""
        units, by_key = self._units(self.render(messages, system), images)
        resume = self.prompt_cache.lookup(units) if self.prompt_cache is not None else None
        self.reset()
        start, groups = 0, []
        if resume is not None:
            self.engine.load_context(resume.saved.context, upto=resume.position)
            start, groups = resume.units, [g for g in resume.saved.groups if g[1] <= resume.position]
        rest = units[start:]
        inputs = self._inputs(rest, by_key)
        mask = inputs.get("vision_mask")
        if mask is not None and mask.any():
            at = self.engine.position + np.flatnonzero(mask)
            groups = groups + [(int(at[0]), int(at[-1]) + 1)]
        self.turns = 1
        return dict(inputs=inputs, pending=Pending(units, groups, unit_tokens(units[:start])))

    def remember(self, pending: Pending, fed: list[int], context=None) -> None:
        """Keep the context a request ended with (``context``, else the engine's) in the conversation
        cache: ``pending``'s units and the reply tokens ``fed`` into it."""
        if self.prompt_cache is None:
            return
        self.prompt_cache.save(Saved(tuple(pending.units) + tuple(fed), context or self.engine.save_context(),
                                     pending.groups))

    def forget(self, pending: Pending) -> None:
        """Drop what :meth:`remember` kept of a request cut short (a client gone)."""
        if self.prompt_cache is not None:
            self.prompt_cache.discard(tuple(pending.units))

    def _stream(self, inputs: dict, max_tokens: int = 256, sampler: Sampler | None = None,
                stop: list[str] | None = None, reply: Reply | None = None,
                pending: Pending | None = None, ignore_eos: bool = False) -> Iterator[str]:
        """Yield the reply's text; with ``stop`` strings, text that could begin one is held
        back until it is clear, and the reply ends before the first match. ``ignore_eos``: decode
        ``max_tokens`` whatever. ``pending``: a reply that runs to its end is kept in the
        conversation cache, and so is its prompt once the first token is out (dropped again if the
        reply is cut short: a client gone)."""
        reply = reply if reply is not None else Reply()
        if pending is not None:
            reply.stats.resumed_tokens = pending.resumed
        text = ReplyText(self.tokenizer, stop, reply)
        tokens = generate_tokens(self.engine, max_tokens=max_tokens, sampler=sampler or Sampler(SamplerArgs()),
                                 eos_ids=() if ignore_eos else self.eos_ids, stats=reply.stats, **inputs)
        fed, ended = [], False
        try:
            for token in tokens:
                fed.append(token)
                piece = text.add(token)
                if piece:
                    yield piece
                if text.stopped:
                    break
                if pending is not None and len(fed) == 1:  # the prompt alone, for requests that share it
                    self.remember(pending, [])  # (after the first piece is out; not yet fed)
            else:
                piece = text.finish()
                if piece:
                    yield piece
            ended = True
        finally:  # also when the consumer stops reading (a client gone)
            tokens.close()
            self._unfed = reply.stats.unfed_token
            if pending is not None:
                if ended:
                    self.remember(pending, fed[:-1] if self._unfed is not None else fed)
                else:
                    self.forget(pending)


class ReplyText:
    """A reply's text as its tokens arrive: streamed in pieces, with ``stop`` strings matched; text
    that could begin one is held back until it is clear, and the reply ends before the first
    match (``reply.text`` is exactly the pieces given; ``stopped`` once one matched)."""

    def __init__(self, tokenizer, stop: list[str] | None, reply: Reply):
        self.detok = StreamingDetokenizer(tokenizer)
        self.stops = [s for s in (stop or []) if s]
        self.reply, self.text, self.sent, self.stopped = reply, "", 0, False

    def add(self, token: int) -> str:
        self.text += self.detok.add(token)
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self.detok.finish()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text, stops = self.text, self.stops
        hits = [h for h in (text.find(s) for s in stops) if h >= 0]
        end = min(hits) if hits else len(text)
        if not hits and not final:  # hold back a tail that may begin a stop string
            for s in stops:
                n = next((n for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), 0)
                end = min(end, len(text) - n)
        piece, self.sent = text[self.sent:end], max(self.sent, end)
        self.reply.text = text[:self.sent]
        if hits:
            self.reply.stats.finish_reason = "stop"
            self.stopped = True
        return piece


def open_session(model_dir, backend: str = "mlx", dtype: str | None = None, chat_template: bool = False,
                 prompt_cache_bytes: int = 0, vision_cache_bytes: int = 0, **kwargs) -> Session:
    check_bytes(prompt_cache_bytes, "prompt_cache_bytes")  # before the weights load
    check_bytes(vision_cache_bytes, "vision_cache_bytes")
    tokenizer = load_tokenizer(model_dir)  # checked before the (slower) weights load
    return Session(open_engine(model_dir, backend=backend, dtype=dtype, **kwargs), model_dir, tokenizer,
                   chat_template=chat_template, prompt_cache_bytes=prompt_cache_bytes,
                   vision_cache_bytes=vision_cache_bytes)


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
