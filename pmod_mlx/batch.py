"""Continuous batching of decode steps (``MLXEngine.new_batch``), in the style of mlx-lm's
``BatchKVCache``.

Layout. Each layer keeps its rows' K and V in one buffer ``[B, n_kv, cap, D]`` and, beside them,
the position each entry holds ``[B, cap]`` (-1: none). Columns ``[0, length)`` are in use; a row
with fewer entries than the layer's longest is left-padded, so every row's newest entry ends at
``length``. A decode step writes each named row's new K/V at column ``length`` (in place, into
spare columns grown in steps of 256 as in ``LayerKVCache``) and attends over columns
``[0, length]`` with the mask ``positions >= 0``, so padding is never seen and each row's
softmax is over exactly the entries it holds alone. Layers differ in length and padding (a MoD
layer holds only the tokens it kept, and each row its own prompt and image), so each layer has
its own buffers and mask; no entry is dropped or made up. A row not named in a step gets no entry
at that column (a hole, masked like the padding). Only a row joining or leaving re-pads: a join
left-pads the new row, or the others, to the longer length; a leave drops the row and the
leading columns no other row uses.

Positions are per row: a row's next RoPE position is its context's ``position`` (tokens that
reached the model), never a cache length (MoD layers skipped some tokens and each row has its own
prompt), so the batch keeps one per row and advances it when the row is fed.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pmod.engine import Context, DecodeBatch
from pmod.errors import PmodError

from .language import LanguageModel, rope_tables


class LayerBatch:
    """One layer's entries of every row, left-padded (the module docstring); a layer cache that
    ``Attention`` writes through ``update_and_fetch``, which takes the step's rows (``rows``)."""

    step = 256

    def __init__(self, n_kv: int, head_dim: int, dtype):
        self.shape, self.dtype = (n_kv, head_dim), dtype
        self.rows: mx.array | None = None  # the rows this step feeds (None: all)
        self.mask: mx.array | None = None  # of the last update_and_fetch
        self._build([], 0)

    def _build(self, parts, length: int) -> None:
        """New buffers of ``length`` columns in use (and spare ones up to the next multiple of
        ``step``) holding ``parts``' rows, each ``(keys, values, positions)`` ``[b, *, w]``
        left-padded to ``length``: one copy of every entry."""
        cap = (length // self.step + 1) * self.step
        B = sum(p.shape[0] for _, _, p in parts)
        self.keys, self.values = (mx.zeros((B, self.shape[0], cap, self.shape[1]), self.dtype) for _ in "kv")
        self.positions = mx.full((B, cap), -1, mx.int32)
        self.length, b = length, 0
        for k, v, p in parts:
            n, w = p.shape
            self.keys[b : b + n, :, length - w : length] = k
            self.values[b : b + n, :, length - w : length] = v
            self.positions[b : b + n, length - w : length] = p
            b += n

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values, self.positions]

    def _columns(self, rows: slice, start: int = 0):
        return (self.keys[rows, :, start : self.length], self.values[rows, :, start : self.length],
                self.positions[rows, start : self.length])

    def update_and_fetch(self, keys: mx.array, values: mx.array, positions: mx.array):
        """Write the rows' new entries ``[n, n_kv, 1, D]`` at column ``length``; return their keys and
        values of every column in use, and set :attr:`mask` to those they hold."""
        col, rows = self.length, self.rows
        if col == self.keys.shape[2]:  # all in use: more spare columns
            self._build([self._columns(slice(None))], col)
        sel = slice(None) if rows is None else rows
        self.keys[sel, :, col : col + 1] = keys
        self.values[sel, :, col : col + 1] = values
        self.positions[sel, col] = positions
        self.length = col + 1
        k, v, p = self._columns(slice(None))
        if rows is not None:
            k, v, p = k[rows], v[rows], p[rows]
        self.mask = (p >= 0)[:, None, None]
        return k, v

    def extend(self, keys: mx.array | None, values: mx.array | None, positions: mx.array) -> None:
        """Add a row holding ``keys``/``values`` ``[1, n_kv, n, D]`` (None: none) at ``positions`` ``[n]``."""
        if keys is None:  # a row without entries in this layer (yet)
            keys = values = mx.zeros((1, self.shape[0], 0, self.shape[1]), self.dtype)
        self._build([self._columns(slice(None)), (keys, values, positions[None])],
                    max(self.length, positions.shape[0]))

    def pop(self, i: int) -> tuple[mx.array, mx.array, mx.array]:
        """Take row ``i`` out: its ``(keys, values, positions)``, its entries only."""
        held = np.array(self.positions[:, : self.length]) >= 0
        cols = np.flatnonzero(held[i])
        if held.shape[0] == 1 and len(cols) and cols[-1] - cols[0] + 1 == len(cols):
            # the last row, fed every step (a lone chat's reply ending): its entries as slices of
            # buffers no other row holds (a saved engine context's slack), and nothing to rebuild
            cols = slice(int(cols[0]), int(cols[-1]) + 1)
            row = (self.keys[:, :, cols], self.values[:, :, cols], self.positions[0, cols])
            self._build([], 0)
            return row
        cols = mx.array(cols)
        row = (self.keys[i : i + 1, :, cols], self.values[i : i + 1, :, cols], self.positions[i, cols])
        used = np.delete(held, i, axis=0).any(axis=0)
        lead = int(np.argmax(used)) if used.any() else self.length  # leading columns no other row uses
        self._build([self._columns(slice(0, i), lead), self._columns(slice(i + 1, None), lead)], self.length - lead)
        return row


class MLXDecodeBatch(DecodeBatch):
    """Rows of saved contexts (``MLXEngine.save_context``) decoded together over ``model``."""

    def __init__(self, model: LanguageModel, dtype):
        self.model = model
        c = model.config
        self.layers = [LayerBatch(c.num_key_value_heads, c.head_dim, dtype) for _ in model.layers]
        self.rows: list[int] = []  # the id of each batch row
        self.positions: list[int] = []  # each row's next RoPE position
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.rows)

    def _index(self, row: int) -> int:
        try:
            return self.rows.index(row)
        except ValueError:
            raise PmodError(f"no row {row} in this batch (its rows: {self.rows})") from None

    def add(self, context: Context) -> int:
        state = context.state
        if not isinstance(state, list) or len(state) != len(self.layers):
            raise PmodError("this context is not an MLX context of this model (MLXEngine.save_context)")
        for layer, entries in zip(self.layers, state):
            layer.extend(*entries)
        mx.eval([layer.state for layer in self.layers])
        self.rows.append(self._next_id)
        self.positions.append(context.position)
        self._next_id += 1
        return self.rows[-1]

    def remove(self, row: int) -> Context:
        i = self._index(row)
        state = [layer.pop(i) for layer in self.layers]
        mx.eval(state, [layer.state for layer in self.layers])
        del self.rows[i]
        position = self.positions.pop(i)
        kept = [np.array(p) for _, _, p in state]
        return Context(position, kept, sum(k.nbytes + v.nbytes for k, v, _ in state), state)

    def step(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        order = sorted(self._index(r) for r in tokens)
        if not order:
            return {}
        limit = self.model.config.max_position_embeddings
        for i in order:
            if self.positions[i] + 1 > limit:
                raise PmodError(f"row {self.rows[i]} is full: {self.positions[i] + 1} tokens exceed the context of "
                                f"{limit} (max_position_embeddings)")
        rows = None if len(order) == len(self.rows) else mx.array(order)
        for layer in self.layers:
            layer.rows = rows
        ids = mx.array([int(tokens[self.rows[i]]) for i in order])
        positions = mx.array([self.positions[i] for i in order])
        h = self.model.embed_tokens(ids[:, None])
        rope = rope_tables(self.model.config, positions[:, None])  # each row at its own position
        for decoder, layer in zip(self.model.layers, self.layers):
            h = decoder(h, rope, layer, None)  # no routing: every layer is dense for a text token
        logits = self.model.logits(h)[:, 0].astype(mx.float32)
        mx.eval(logits, [layer.state for layer in self.layers])
        for i in order:
            self.positions[i] += 1
        out = np.array(logits)
        return {self.rows[i]: out[j] for j, i in enumerate(order)}
