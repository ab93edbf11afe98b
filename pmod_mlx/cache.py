"""Per-layer KV caches that remember which positions they hold.

A MoD layer caches only the tokens it kept, so cache lengths differ per layer and a
cache's length is never the next RoPE position. Each cache therefore tracks two
counts: ``size()`` (tokens held) and ``offset`` (tokens that reached the layer, kept or
skipped, i.e. the next position), plus ``positions`` (the positions it holds).

Buffers grow in steps and are updated in place, as in mlx-lm's ``KVCache``.
"""

from __future__ import annotations

import mlx.core as mx


class LayerKVCache:
    step = 256
    #: the keys each row sees of those ``update_and_fetch`` returns (a padded batch's,
    #: ``pmod_mlx.batch``); None: all of them
    mask = None

    def __init__(self):
        self._keys = None
        self._values = None
        self._positions = None
        self.length = 0  # tokens held
        self.offset = 0  # tokens seen: the next RoPE position

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, n_kv, _, dk = keys.shape
        cap = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, n_kv, cap, dk), keys.dtype)
        new_v = mx.zeros((B, n_kv, cap, values.shape[3]), values.dtype)
        new_p = mx.zeros((cap,), mx.int32)
        if self._keys is not None and self.length:
            new_k[..., : self.length, :] = self._keys[..., : self.length, :]
            new_v[..., : self.length, :] = self._values[..., : self.length, :]
            new_p[: self.length] = self._positions[: self.length]
        self._keys, self._values, self._positions = new_k, new_v, new_p

    def update_and_fetch(self, keys: mx.array, values: mx.array, positions: mx.array):
        """Append the processed tokens (K post-RoPE) and return every held K, V."""
        n = keys.shape[2]
        end = self.length + n
        if self._keys is None or end > self._keys.shape[2]:
            self._grow(keys, values, end)
        self._keys[..., self.length : end, :] = keys
        self._values[..., self.length : end, :] = values
        self._positions[self.length : end] = positions
        self.length = end
        return self.keys, self.values

    def advance(self, n_tokens: int) -> None:
        """Record that a chunk of ``n_tokens`` reached this layer (kept or skipped)."""
        self.offset += n_tokens

    @property
    def state(self) -> list[mx.array]:
        """The buffers, for ``mx.eval`` together with the step's output."""
        return [a for a in (self._keys, self._values, self._positions) if a is not None]

    def size(self) -> int:
        return self.length

    @property
    def keys(self) -> mx.array | None:
        return None if self._keys is None else self._keys[..., : self.length, :]

    @property
    def values(self) -> mx.array | None:
        return None if self._values is None else self._values[..., : self.length, :]

    @property
    def positions(self) -> mx.array:
        if self._positions is None:
            return mx.zeros((0,), mx.int32)
        return self._positions[: self.length]

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V entries held (not the spare capacity)."""
        if self._keys is None:
            return 0
        per_token = (self._keys.shape[1] * (self._keys.shape[3] + self._values.shape[3])
                     * self._keys.dtype.size)
        return per_token * self.length


def make_cache(num_layers: int) -> list[LayerKVCache]:
    return [LayerKVCache() for _ in range(num_layers)]


def restore_cache(layers: list[tuple], position: int, upto: int | None = None) -> list[LayerKVCache]:
    """Caches holding a saved context's ``(keys, values, positions)`` per layer (``MLXEngine.save_context``),
    only the entries at positions ``< upto`` where given. A layer's entries are in position order,
    so that is a leading slice; the saved arrays are never written (a cache grows into new buffers)."""
    out = []
    for keys, values, positions in layers:
        c = LayerKVCache()
        c.offset = position if upto is None else min(upto, position)
        if keys is not None:
            n = int(mx.sum(positions < c.offset).item()) if upto is not None else positions.shape[0]
            c._keys, c._values, c._positions = keys[..., :n, :], values[..., :n, :], positions[:n]
            c.length = n
        out.append(c)
    return out
