"""A conversation over any engine: template, images, streaming, caches kept across turns.

``pmod generate``, ``pmod chat`` and ``pmod server`` are written on this one class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import prompt
from .engine import Engine
from .errors import PmodError
from .generate import GenerationStats, Sampler, SamplerArgs, generate_tokens
from .tokenizer import StreamingDetokenizer, load_tokenizer


@dataclass
class Reply:
    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)


class Session:
    def __init__(self, engine: Engine, model_dir: str | Path, tokenizer=None):
        self.engine = engine
        self.config = engine.config
        self.model_dir = Path(model_dir)
        self.tokenizer = tokenizer or load_tokenizer(model_dir)
        self._processor = None
        self.eos_ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.turns = 0
        self._unfed: int | None = None  # the last reply's final token, when not yet in the context

    def reset(self) -> None:
        self.engine.reset()
        self.turns = 0
        self._unfed = None

    # ------------------------------------------------------------------ inputs
    @property
    def processor(self):
        """Image preprocessing settings, read on the first image."""
        from .image import ImageProcessorConfig

        if self.config.vision_config is None:
            raise PmodError(
                f"{self.model_dir} has no vision tower, so it cannot take images: re-convert it with "
                "'pmod convert SRC DST --vision-tower CLIP_DIR'")
        if self._processor is None:
            self._processor = ImageProcessorConfig.for_model(self.config, self.model_dir)
        return self._processor

    def encode(self, text: str, images=(), add_bos: bool = True) -> dict:
        """Prefill arguments for ``text`` whose ``<image>`` markers are filled by ``images``."""
        from .image import preprocess

        segments = prompt.split_segments(prompt.tokenize(self.tokenizer, text, add_bos=add_bos))
        if not images:
            return dict(input_ids=segments[0] if segments else np.zeros(0, np.int32))
        processor = self.processor
        inputs = [preprocess(img, self.config, processor) for img in images]
        n_tokens = sum(len(s) for s in segments if s is not None) + sum(i.num_tokens for i in inputs)
        self.engine.check_room(n_tokens)  # before the (costly) vision tower runs
        embeds, masks, it = [], [], iter(inputs)
        for seg in segments:
            if seg is None:
                image = next(it)
                embeds.append(self.engine.encode_image(image))
                masks.append(image.routed_mask(self.config.mod_target_token_type))
            else:
                embeds.append(self.engine.embed(seg))
                masks.append(np.zeros(len(seg), dtype=bool))
        return dict(inputs_embeds=np.concatenate(embeds), vision_mask=np.concatenate(masks))

    # ---------------------------------------------------------------- generate
    def ask(self, text: str, images=(), **kwargs) -> Iterator[str]:
        """Stream the reply to one more user message; earlier turns stay in the caches."""
        message = prompt.Message("user", text, len(images))
        if self.turns == 0:
            turn = prompt.SYSTEM + prompt.SEP + prompt.user_turn(message)
        else:  # the last reply's </s> was sampled, not fed: it opens this turn
            turn = prompt.SEP2 + prompt.user_turn(message)
        inputs = self.encode(turn, images, add_bos=self.turns == 0)
        if self._unfed is not None:
            inputs = self._prepend(self._unfed, inputs)
        self.turns += 1
        return self._stream(inputs, **kwargs)

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
        inputs = self.encode(prompt.render(messages, system=system or prompt.SYSTEM), images)
        self.turns = 1
        return self._stream(inputs, **kwargs)

    def _stream(self, inputs: dict, max_tokens: int = 256, sampler: Sampler | None = None,
                stop: list[str] | None = None, reply: Reply | None = None) -> Iterator[str]:
        reply = reply if reply is not None else Reply()
        detok = StreamingDetokenizer(self.tokenizer)
        stops = [s for s in (stop or []) if s]
        tokens = generate_tokens(self.engine, max_tokens=max_tokens, sampler=sampler or Sampler(SamplerArgs()),
                                 eos_ids=self.eos_ids, stats=reply.stats, **inputs)
        try:
            for token in tokens:
                piece = detok.add(token)
                if stops and piece:
                    full = reply.text + piece
                    hits = [full.find(s, max(0, len(reply.text) - len(s))) for s in stops]
                    hits = [h for h in hits if h >= 0]
                    if hits:
                        piece = full[len(reply.text):min(hits)]
                        reply.text += piece
                        reply.stats.finish_reason = "stop"
                        if piece:
                            yield piece
                        return
                reply.text += piece
                if piece:
                    yield piece
            tail = detok.finish()
            reply.text += tail
            if tail:
                yield tail
        finally:  # also when the consumer stops reading (a client gone)
            tokens.close()
            self._unfed = reply.stats.unfed_token


def open_session(model_dir, backend: str = "mlx", dtype: str | None = None, **kwargs) -> Session:
    from . import open_engine

    tokenizer = load_tokenizer(model_dir)  # checked before the (slower) weights load
    return Session(open_engine(model_dir, backend=backend, dtype=dtype, **kwargs), model_dir, tokenizer)
