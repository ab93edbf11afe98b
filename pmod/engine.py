"""The backend-neutral engine interface that every runtime implements.

Numpy at the boundary: a backend takes token ids or embeddings as numpy arrays and
returns last-position logits as a float32 numpy vector. Generation, chat, the server
and the benchmark are written once against this class.

Runtimes are imported by name only when asked for, so ``pmod`` imports no runtime.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import numpy as np

from .config import PmodConfig
from .errors import PmodError

# backend name -> ("module:factory", pip extra that provides it)
BACKENDS: dict[str, tuple[str, str]] = {
    "mlx": ("pmod_mlx.engine:MLXEngine", "mlx"),
    "torch": ("pmod_export.torch_engine:TorchEngine", "export"),
    "onnx": ("pmod_export.ort_engine:OrtEngine", "export"),
    "trt": ("pmod_trt.engine:TrtEngine", "trt"),
}


class Engine(ABC):
    """A loaded model plus its per-layer KV caches (batch size 1)."""

    config: PmodConfig
    #: The retention dial the model runs at (``pmod.schedule.layer_ratios``; 1: as trained).
    retention: float = 1.0

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

    def embed(self, input_ids) -> np.ndarray:
        """Token embeddings [T, H] (float32), for splicing in image features."""
        raise PmodError(f"backend {type(self).__name__} cannot return embeddings")

    def encode_image(self, image) -> np.ndarray:
        """Projected, packed features ``[n_image_tokens, H]`` (float32) of a ``pmod.image.ImageInput``."""
        raise PmodError(f"backend {type(self).__name__} cannot encode images")

    def check_room(self, n_new: int) -> None:
        """Refuse a chunk that would overflow the context window."""
        limit = self.config.max_position_embeddings
        if self.position + n_new > limit:
            raise PmodError(
                f"prompt too long: {self.position + n_new} tokens exceed the context of "
                f"{limit} (max_position_embeddings); shorten the prompt")


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


def open_engine(path, backend: str = "mlx", dtype: str | None = None, **kwargs) -> Engine:
    """Open a pmod checkpoint directory with the chosen runtime.

    ``dense=True`` gives the plain-LLaVA twin on the same weights: every layer runs over
    every token, routers unused (for p-MoD vs dense comparisons). ``adapter_path=DIR`` (mlx)
    applies a LoRA adapter written by ``pmod lora``; other backends load ``pmod fuse``'s output.
    ``retention=S`` scales every MoD layer's ratio (``pmod.schedule.layer_ratios``): mlx and
    torch take any S > 0; an ONNX/TensorRT export runs at the S it was exported with.
    """
    if backend not in BACKENDS:
        raise PmodError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if kwargs.get("retention") is None:
        kwargs.pop("retention", None)
    else:
        from .schedule import check_retention

        kwargs["retention"] = check_retention(kwargs["retention"])
    if kwargs.get("adapter_path") is None:
        kwargs.pop("adapter_path", None)
    elif backend != "mlx":
        raise PmodError(f"the {backend} backend takes no LoRA adapter: merge it first with 'pmod fuse --model "
                        f"{path} --adapter-path {kwargs['adapter_path']} --out FUSED' and open FUSED")
    target, extra = BACKENDS[backend]
    module_name, factory = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        top = module_name.split(".")[0]
        if e.name and e.name != top and e.name.startswith(top + "."):
            raise  # a bug inside the runtime, not a missing install
        raise PmodError(
            f"backend {backend!r} is not installed ({e.name or e}): pip install 'pmod[{extra}]'") from None
    return getattr(module, factory)(path, dtype=dtype, **kwargs)
