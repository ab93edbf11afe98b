"""Streaming generation over any engine, and the ``pmod generate`` command.

Sampling is done here in numpy because it runs on the logits every backend returns at
the ``open_engine`` boundary (mlx-lm's samplers work on MLX arrays only).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pmod.engine import Engine
from pmod.errors import PmodError


@dataclass
class SamplerArgs:
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temp >= 0):
            raise PmodError(f"--temp must be >= 0, got {self.temp}")
        if not (0 < self.top_p <= 1):
            raise PmodError(f"--top-p must be in (0, 1], got {self.top_p}")


class Sampler:
    """Greedy at temperature 0, else temperature softmax with optional nucleus (top-p)."""

    def __init__(self, args: SamplerArgs):
        self.args = args
        self.rng = np.random.default_rng(args.seed)

    @property
    def greedy(self) -> bool:
        """Whether this picks the argmax (an engine can then pick it where its logits are)."""
        return self.args.temp == 0

    def __call__(self, logits: np.ndarray) -> int:
        if self.args.temp == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.args.temp
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.args.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            n_keep = int(np.searchsorted(cum, self.args.top_p) + 1)
            keep = order[:n_keep]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(p.shape[0], p=p))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    finish_reason: str = ""
    image_tokens: int = 0
    unfed_token: int | None = None  # the last token yielded but not yet in the context
    context_tokens: int = 0
    resumed_tokens: int = 0  # prompt tokens resumed from the conversation cache, not prefilled
    kv_lengths: list[int] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


class Decoding:
    """The rules of one reply's tokens, one at a time, for serial and batched generation alike.

    :meth:`take` gets the next sampled token and says whether it is part of the reply (an EOS
    token ends it and is not); :meth:`more` then says whether to feed it and go on (not after
    ``max_tokens`` or once the context is full). The token yielded last and not fed is
    ``stats.unfed_token``, so a conversation can feed it before its next turn.
    """

    def __init__(self, sampler: Sampler, max_tokens: int, eos_ids, limit: int, stats: GenerationStats):
        self.sampler, self.max_tokens, self.limit, self.stats = sampler, max_tokens, limit, stats
        self.eos = set(int(e) for e in eos_ids)
        stats.finish_reason = "length"
        self.done = max_tokens < 1

    def take(self, token: int) -> bool:
        if token in self.eos:
            self.stats.finish_reason, self.done = "stop", True
            return False
        self.stats.generated_tokens += 1
        self.stats.unfed_token = token
        return True

    def more(self, position: int) -> bool:
        if self.stats.generated_tokens >= self.max_tokens:
            self.done = True
        elif position >= self.limit:
            self.stats.finish_reason, self.done = "context", True
        return not self.done

    def fed(self, seconds: float) -> None:
        """The last token went into the context (one decode step of ``seconds``)."""
        self.stats.unfed_token = None
        self.stats.decode_s += seconds
        self.stats.decode_steps += 1


def prefill_prompt(engine: Engine, stats: GenerationStats, input_ids=None, inputs_embeds=None,
                   vision_mask=None) -> np.ndarray:
    """Prefill a prompt onto the engine's context, noting its size and time in ``stats``; its logits."""
    t0 = time.perf_counter()
    logits = engine.prefill(input_ids=input_ids, inputs_embeds=inputs_embeds, vision_mask=vision_mask)
    stats.prompt_tokens = len(input_ids) if input_ids is not None else len(inputs_embeds)
    if vision_mask is not None:
        stats.image_tokens = int(np.count_nonzero(vision_mask))
    stats.prefill_s = time.perf_counter() - t0
    return logits


def generate_tokens(engine: Engine, input_ids=None, *, inputs_embeds=None, vision_mask=None,
                    max_tokens: int = 128, sampler: Sampler | None = None,
                    eos_ids=(), stats: GenerationStats | None = None) -> Iterator[int]:
    """Prefill the prompt onto the engine's context, then yield sampled tokens.

    Stops at an EOS token (not yielded), after ``max_tokens``, or when the context is full
    (:class:`Decoding`); ``stats.unfed_token`` is the last token yielded and not fed.
    """
    sampler = sampler or Sampler(SamplerArgs())
    stats = stats if stats is not None else GenerationStats()
    logits = prefill_prompt(engine, stats, input_ids, inputs_embeds, vision_mask)
    rules = Decoding(sampler, max_tokens, eos_ids, engine.config.max_position_embeddings, stats)
    token = sampler(logits)
    try:
        while not rules.done and rules.take(token):
            yield token
            if not rules.more(engine.position):
                break
            t1 = time.perf_counter()
            token = engine.decode_greedy(token) if sampler.greedy else sampler(engine.decode(token))
            rules.fed(time.perf_counter() - t1)
    finally:  # also when the caller stops early (a stop string)
        stats.context_tokens = engine.position
        stats.kv_lengths = engine.kv_lengths()


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def print_stats(stats: GenerationStats, file=None) -> None:
    file = file or sys.stderr
    image = f" ({stats.image_tokens} routed vision tokens)" if stats.image_tokens else ""
    print(f"prompt: {stats.prompt_tokens} tokens{image}, {stats.prefill_tps:.1f} tokens/s", file=file)
    print(f"generation: {stats.generated_tokens} tokens, {stats.decode_tps:.1f} tokens/s "
          f"(finish: {stats.finish_reason})", file=file)
    if stats.kv_lengths:
        held, dense = sum(stats.kv_lengths), len(stats.kv_lengths) * stats.context_tokens
        print(f"KV cache: {held} entries held vs {dense} for a dense model "
              f"({100 * held / max(dense, 1):.1f}%)", file=file)
    print(f"peak memory: {peak_memory_bytes() / 1e9:.3f} GB", file=file)
