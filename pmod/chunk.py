"""Host side of the static decoder: a prefill chunk split into its text and vision streams.

The engine API takes a chunk as embeddings ``[T, H]`` plus a ``vision_mask`` ``[T]``. The
static graphs take it as a text stream (the unrouted tokens, any count) and a vision
stream of exactly ``N`` slots (``n`` real, then padding), each with its RoPE positions:
the number of text tokens ``T - n`` is data, so the graph could not derive it from shapes
(see ``pmod_export.decoder``). This split is pure bookkeeping (two gathers), shared by the
static-shape runtimes (ONNX Runtime, torch, TensorRT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.schedule import capacities


@dataclass
class Chunk:
    text_embeds: np.ndarray  # [1, Tt, H]
    text_positions: np.ndarray  # int32 [1, Tt]
    vision_embeds: np.ndarray | None  # [1, N, H], rows >= n are zero (None: a text chunk)
    vision_positions: np.ndarray | None  # int32 [1, N], padding at 0
    n_vision: int
    length: int  # T: tokens the chunk adds to the context

    @property
    def text_len(self) -> int:
        return int(self.text_embeds.shape[1])

    def feeds(self) -> dict[str, np.ndarray]:
        """Graph inputs other than the KV cache (names as in the manifest)."""
        d = {"text_embeds": self.text_embeds, "text_positions": self.text_positions}
        if self.vision_embeds is not None:
            d.update(vision_embeds=self.vision_embeds, vision_positions=self.vision_positions,
                     n_vision=np.array([self.n_vision], dtype=np.int32))
        return d


def split_chunk(embeds: np.ndarray, mask: np.ndarray, start: int, max_vision: int,
                flag: str = "--max-vision-tokens", then: str = "") -> Chunk:
    """Split ``embeds`` ``[T, H]`` by ``mask`` into the streams for a graph with ``max_vision`` slots.

    A chunk without vision tokens gives a text chunk (``vision_embeds`` None). More than
    ``max_vision`` vision tokens is an error naming ``flag`` (and ``then``, what else to redo).
    """
    mask = np.asarray(mask, dtype=bool)
    T, H = embeds.shape
    n = int(mask.sum())
    if n > max_vision:
        raise PmodError(f"the chunk has {n} routed vision tokens but the model was exported for at most "
                        f"{max_vision}: re-export with {flag} {n} or more{then}")
    positions = np.arange(start, start + T, dtype=np.int32)
    text = ~mask
    chunk = Chunk(embeds[text][None], positions[text][None], None, None, n, T)
    if n:
        vis = np.zeros((1, max_vision, H), dtype=embeds.dtype)
        vis[0, :n] = embeds[mask]
        pos = np.zeros((1, max_vision), dtype=np.int32)
        pos[0, :n] = positions[mask]
        chunk.vision_embeds, chunk.vision_positions = vis, pos
    return chunk


def live_lengths(config: PmodConfig, chunk: Chunk, retention: float = 1.0) -> list[int]:
    """Live KV entries each layer gains from ``chunk``: its text tokens plus ``k_l = kept_count(n, r_l)``
    (``r_l`` scaled by the ``retention`` dial the graphs were built for)."""
    return [chunk.text_len + k for k in capacities(config, chunk.n_vision, retention)]
