"""The backend-neutral engine interface that every runtime implements.

Numpy at the boundary: a backend takes token ids or embeddings as numpy arrays and
returns last-position logits as a float32 numpy vector. Generation, chat, the server
and the benchmark are written once against this class; ``pmod.app.registry.open_engine``
picks the runtime.

Besides running the model, an engine answers what the benchmark asks of its runtime, so that
no application imports one: ``runtime_info()`` (device, dtypes, BLAS, kernels),
``matmul_probe(n)`` (one float32 matmul on its device), ``profiled(timer)`` (per-layer
section times, :class:`LayerProbe`), ``stopwatch()`` (timing on the engine's device) and
``kernel_settings()`` (the MoD kernels on and off).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from pmod.config import PmodConfig
from pmod.errors import PmodError

#: The sections of a decoder layer a :class:`LayerProbe` books time to.
LAYER_SECTIONS = ("route", "attention", "mlp", "merge")


class LayerProbe(Protocol):
    """What a runtime calls at the section boundaries of a prefill under ``Engine.profiled``.

    ``enter(layer, *arrays)`` as layer ``layer`` starts (``None`` after the last layer);
    ``mark(section, *arrays)`` as ``section`` of the current layer ends: ``"route"`` (a MoD
    layer's scores, top-k and gather; a runtime may mark an empty one in a layer that does not
    route), then ``"attention"``, then ``"mlp"``; the rest, up to the next ``enter``, is the
    layer's ``"merge"``. ``arrays`` are the section's outputs (possibly none): a runtime whose graph
    is lazy sets ``sync`` (e.g. MLX's ``mx.eval``) before the prefill, for the probe to call on
    them before it reads the clock; an eager one leaves it as it is.
    """

    sync: Callable | None

    def enter(self, layer: int | None, *arrays) -> None: ...

    def mark(self, section: str, *arrays) -> None: ...


@dataclass(eq=False)
class Context:
    """A detached copy of an engine's context (``Engine.save_context``): what each layer's KV
    cache holds and the next position, in the runtime's own arrays (``state``; opaque here).
    A conversation cache keeps these and puts one back with ``Engine.load_context``; a
    :class:`DecodeBatch` decodes several at once."""

    position: int
    #: the positions each layer's cache holds (MoD layers: text + kept vision tokens)
    kept: list[np.ndarray]
    #: bytes of the K/V entries held
    nbytes: int
    state: Any = field(repr=False, default=None)


class DecodeBatch(ABC):
    """Contexts decoded together (continuous batching): each decode step feeds one token per row and
    returns each row's logits. Rows join (:meth:`add`, a context prefilled alone) and leave
    (:meth:`remove`) between steps; their per-layer caches keep their own lengths (a MoD
    layer's hold only the tokens it kept), so each row's result equals decoding it alone."""

    @abstractmethod
    def add(self, context: Context) -> int:
        """A row decoding ``context`` from now on; its id (stable while it is in the batch)."""

    @abstractmethod
    def remove(self, row: int) -> Context:
        """Take row ``row`` out; its context as it stands (for a conversation cache)."""

    @abstractmethod
    def step(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """Append ``tokens[row]`` to each row named (rows not named wait this step); their logits [V]."""

    @abstractmethod
    def __len__(self) -> int:
        """Rows in the batch."""


class Engine(ABC):
    """A loaded model plus its per-layer KV caches (batch size 1)."""

    config: PmodConfig
    #: The retention dial the model runs at (``pmod.schedule.layer_ratios``; 1: as trained).
    retention: float = 1.0
    #: Whether :meth:`profiled` times this engine's decoder layers (``pmod bench --profile``).
    profiles_layers: bool = False

    @abstractmethod
    def prefill(self, input_ids=None, inputs_embeds=None, vision_mask=None) -> np.ndarray:
        """Append a chunk of tokens to the context; return the last position's logits [V].

        ``input_ids``: int [T]; or ``inputs_embeds``: float [T, H] (e.g. text embeddings
        with image features spliced in) with ``vision_mask``: bool [T] marking the
        vision tokens that MoD layers route.
        """

    @abstractmethod
    def decode(self, token_id: int) -> np.ndarray:
        """Append one text token; return its logits [V]."""

    def decode_greedy(self, token_id: int) -> int:
        """Append one text token; return the argmax of its logits (greedy decoding). A runtime
        whose logits live on an accelerator picks it there, so only the token reaches the host."""
        return int(np.argmax(self.decode(token_id)))

    @abstractmethod
    def kv_lengths(self) -> list[int]:
        """Tokens held in each layer's KV cache."""

    def kept_positions(self) -> list[np.ndarray]:
        """The positions each layer's KV cache holds (MoD layers: text + kept vision tokens)."""
        raise PmodError(f"backend {type(self).__name__} does not report cached positions")

    @abstractmethod
    def reset(self) -> None:
        """Drop the context (empty every cache)."""

    @property
    @abstractmethod
    def position(self) -> int:
        """Tokens in the context so far (the next token's RoPE position)."""

    # ------------------------------------------------------------------ contexts
    #: whether :meth:`save_context` / :meth:`load_context` work (conversation caches)
    resumes: bool = False
    #: whether :meth:`new_batch` works (batched decoding of several contexts)
    batches: bool = False

    def save_context(self) -> Context:
        """A copy of the current context, which later calls do not change."""
        raise PmodError(f"backend {type(self).__name__} cannot save its context")

    def load_context(self, context: Context, upto: int | None = None) -> None:
        """Make ``context`` the engine's context (it stays unchanged), keeping only the entries at
        positions ``< upto`` (None: all). The caller makes sure the cut is exact: that no vision
        block routed together straddles ``upto``."""
        raise PmodError(f"backend {type(self).__name__} cannot load a saved context")

    def new_batch(self) -> DecodeBatch:
        """An empty :class:`DecodeBatch` over this engine's model."""
        raise PmodError(f"backend {type(self).__name__} cannot decode a batch")

    def embed(self, input_ids) -> np.ndarray:
        """Token embeddings [T, H] (float32), for splicing in image features."""
        raise PmodError(f"backend {type(self).__name__} cannot return embeddings")

    def encode_image(self, image) -> np.ndarray:
        """Projected, packed features ``[n_image_tokens, H]`` (float32) of a ``pmod.image.ImageInput``."""
        raise PmodError(f"backend {type(self).__name__} cannot encode images")

    # ------------------------------------------------------------------ the runtime
    def runtime_info(self) -> dict:
        """What runs this engine: ``device`` ("cpu", "metal", "cuda"), ``dtype`` (compute dtype
        name), ``kv_dtype`` (the KV cache's), ``blas`` (the CPU BLAS in use as a dict, or None
        where the runtime does not say) and ``kernels`` (whether the MoD kernels run now; None:
        the runtime has none to switch)."""
        raise PmodError(f"backend {type(self).__name__} does not describe its runtime")

    def matmul_probe(self, n: int) -> Callable[[], None] | None:
        """A call that runs one float32 ``n x n`` matmul on this engine's device and waits for it
        (inputs made and placed beforehand); None where the runtime has no single-matmul probe."""
        raise PmodError(f"backend {type(self).__name__} has no matmul probe")

    def profiled(self, timer: LayerProbe) -> AbstractContextManager:
        """A context in which every prefill calls ``timer`` at its layers' section boundaries
        (:class:`LayerProbe`), setting ``timer.sync`` where the runtime is lazy; detached on exit.
        Only where :attr:`profiles_layers`."""
        raise PmodError(f"backend {type(self).__name__} has no per-layer profile")

    def stopwatch(self) -> Stopwatch:
        """A context that times the engine calls made inside it (``.seconds`` once closed): the
        wall clock here; a runtime that runs asynchronously on an accelerator times its own
        work there (torch on CUDA: CUDA events)."""
        return Stopwatch()

    def device_memory(self, reset: bool = False) -> int | None:
        """Peak bytes the engine's accelerator allocator has held since the last ``reset=True``
        call (which starts a new count); None where the engine runs on the CPU."""
        return None

    def kernel_settings(self) -> Iterator[bool | None]:
        """Switch the MoD kernels for a comparison: a runtime with kernels that run now yields
        True (on), then False (their twins in the same framework), and switches them back on
        when closed; otherwise it yields None once (nothing to switch)."""
        yield None

    def check_room(self, n_new: int) -> None:
        """Refuse a chunk that would overflow the context window."""
        limit = self.config.max_position_embeddings
        if self.position + n_new > limit:
            raise PmodError(
                f"prompt too long: {self.position + n_new} tokens exceed the context of "
                f"{limit} (max_position_embeddings); shorten the prompt")


class Stopwatch:
    """Wall-clock seconds of the block it guards (``with engine.stopwatch() as t: ...; t.seconds``)."""

    seconds: float = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0


def _normalize_inputs(input_ids, inputs_embeds, vision_mask, hidden_size: int):
    """Check and normalise the prefill arguments shared by every backend."""
    if (input_ids is None) == (inputs_embeds is None):
        raise PmodError("prefill needs exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        ids = np.asarray(input_ids)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise PmodError(f"input_ids must have shape [T] (batch size 1), got {list(ids.shape)}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise PmodError(f"input_ids must be integers, got {ids.dtype}")
        n = ids.shape[0]
        ids = ids.astype(np.int32)
        emb = None
    else:
        emb = np.asarray(inputs_embeds)
        if emb.ndim == 3 and emb.shape[0] == 1:
            emb = emb[0]
        if emb.ndim != 2 or emb.shape[1] != hidden_size:
            raise PmodError(
                f"inputs_embeds must have shape [T, {hidden_size}] (batch size 1), got {list(emb.shape)}")
        n = emb.shape[0]
        ids = None
    if n == 0:
        raise PmodError("prefill needs at least one token")
    if vision_mask is None:
        mask = np.zeros(n, dtype=bool)
    else:
        mask = np.asarray(vision_mask)
        if mask.ndim == 2 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.shape != (n,):
            raise PmodError(f"vision_mask must have shape [{n}] to match the tokens, got {list(mask.shape)}")
        mask = mask.astype(bool)
    return ids, emb, mask
