"""Per-layer KV buffers for the static graphs: live prefix + room for one chunk's slots.

Layer ``l`` keeps keys and values ``[capacity, n_kv, D]`` and positions ``[capacity]``
(int32), sequence-major so the live prefix ``[:length]`` is one contiguous block: it is
passed to a graph as ``past_*`` ``[1, length, ...]`` without a copy, and the graph's
``new_*`` outputs (``S_l`` slots) are written right after it. The layer's length then
grows by its live count only (``pmod.chunk.live_lengths``), so the dead tail of a
chunk is overwritten by the next one and the cache holds only kept tokens. MoD layers
hold fewer entries than dense ones, as in the dynamic runtime.

Entries are in slot order (a chunk's text, then its vision tokens), not position order:
attention masks by position, so the order does not matter.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    """Host (numpy) buffers; grown in steps of ``step`` entries when a chunk needs room."""

    step = 256

    def __init__(self, num_layers: int, n_kv: int, head_dim: int, dtype, capacity: int = 0):
        self.n_kv, self.head_dim, self.dtype = n_kv, head_dim, np.dtype(dtype)
        self.keys = [self._alloc(capacity) for _ in range(num_layers)]
        self.values = [self._alloc(capacity) for _ in range(num_layers)]
        self.positions = [np.zeros(capacity, np.int32) for _ in range(num_layers)]
        self.lengths = [0] * num_layers

    def _alloc(self, n: int) -> np.ndarray:
        return np.zeros((n, self.n_kv, self.head_dim), self.dtype)

    def reserve(self, slots: list[int]) -> None:
        """Make room for ``slots[l]`` entries after each layer's live prefix."""
        for l, s in enumerate(slots):
            need = self.lengths[l] + s
            if need > self.keys[l].shape[0]:
                cap = -(-need // self.step) * self.step
                n = self.lengths[l]
                for store in (self.keys, self.values):
                    grown = self._alloc(cap)
                    grown[:n] = store[l][:n]
                    store[l] = grown
                pos = np.zeros(cap, np.int32)
                pos[:n] = self.positions[l][:n]
                self.positions[l] = pos

    def past(self, l: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views ``[1, length, n_kv, D]``, ``[1, length, n_kv, D]``, ``[1, length]`` of layer ``l``'s live entries."""
        n = self.lengths[l]
        return self.keys[l][None, :n], self.values[l][None, :n], self.positions[l][None, :n]

    def tail(self, l: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of the ``count`` entries after the live prefix (where a chunk's slots go)."""
        n = self.lengths[l]
        return (self.keys[l][None, n:n + count], self.values[l][None, n:n + count],
                self.positions[l][None, n:n + count])

    def advance(self, live: list[int]) -> None:
        self.lengths = [n + k for n, k in zip(self.lengths, live)]

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)

    def held_positions(self) -> list[np.ndarray]:
        """The positions each layer holds, in increasing order."""
        return [np.sort(np.asarray(p[:n])) for p, n in zip(self._host_positions(), self.lengths)]

    def _host_positions(self) -> list:
        return self.positions

    @property
    def nbytes(self) -> int:
        """Bytes of the live K and V entries (not the spare capacity)."""
        return sum(self.lengths) * 2 * self.n_kv * self.head_dim * self.dtype.itemsize
