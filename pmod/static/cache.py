"""Per-layer KV buffers of the static graphs: the live prefix, and where a chunk's new entries go.

Layer ``l`` keeps keys and values ``[capacity, n_kv, D]`` and positions ``[capacity]``
(int32), sequence-major, so the live prefix ``[:length]`` is one contiguous block: a graph
reads it in place as ``past_*`` ``[1, length, ...]``, and its ``new_*`` outputs (``slots``
entries, the ``live`` leading ones kept) land right after it. The layer's length then grows
by its live count only, so a MoD layer holds exactly the tokens it kept, as in the dynamic
runtime; a dead tail is overwritten by the next chunk.

Entries are in slot order (a chunk's text, then its vision tokens), not position order:
attention masks by position, so the order does not matter.

* :class:`HostKV`: numpy buffers (ONNX Runtime on the CPU, the eager torch model), grown when a
  chunk needs room; the graph writes straight after the prefix.
* :class:`DeviceKV`: fixed-size device buffers, allocated by a backend (ONNX Runtime's CUDA
  allocator, cudaMalloc for TensorRT). Every address handed to a graph is 256-byte aligned, as
  TensorRT and CUDA kernels require: where ``base + length * entry`` is not, the graph writes
  into aligned scratch and the live entries are copied after the prefix on the device.
"""

from __future__ import annotations

import numpy as np

from pmod.static.contract import kv_names

#: Alignment of every device address given to a graph (TensorRT: 256 bytes).
ALIGN = 256


class KVBuffers:
    """What every KV store does: lengths, bindings, commit, positions held, bytes."""

    def __init__(self, num_layers: int, n_kv: int, head_dim: int, dtype):
        self.n_kv, self.head_dim, self.dtype = n_kv, head_dim, np.dtype(dtype)
        #: bytes of one entry of keys, values and positions
        self.sizes = (n_kv * head_dim * self.dtype.itemsize,) * 2 + (4,)
        self.lengths = [0] * num_layers

    def reserve(self, slots: list[int]) -> None:
        """Make room for ``slots[l]`` new entries after each layer's live prefix."""
        raise NotImplementedError

    def past(self, l: int) -> tuple[int, int, int]:
        """Addresses of layer ``l``'s keys, values and positions (the live prefix starts there)."""
        raise NotImplementedError

    def new(self, l: int, count: int) -> tuple[int, int, int]:
        """Addresses where layer ``l``'s ``count`` new keys, values and positions are written."""
        raise NotImplementedError

    def commit(self, live: list[int]) -> None:
        """After a run: keep the ``live[l]`` leading new entries of each layer."""
        self.lengths = [n + k for n, k in zip(self.lengths, live)]

    def bindings(self, slots: list[int]):
        """``(name, shape, dtype, address, is_output)`` of every layer's ``past_*`` and ``new_*`` tensors."""
        kv = [self.n_kv, self.head_dim]
        for l, s in enumerate(slots):
            n = self.lengths[l]
            for past, new, p_addr, n_addr, tail, dt in zip(kv_names(l, "past"), kv_names(l, "new"), self.past(l),
                                                           self.new(l, s), (kv, kv, []),
                                                           (self.dtype, self.dtype, np.dtype(np.int32))):
                yield past, [1, n] + tail, dt, p_addr, False
                yield new, [1, s] + tail, dt, n_addr, True

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)

    def held_positions(self) -> list[np.ndarray]:
        """The positions each layer holds, in increasing order."""
        return [np.sort(self._positions(l, n)) for l, n in enumerate(self.lengths)]

    def _positions(self, l: int, n: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of the live K and V entries (not the spare capacity)."""
        return sum(self.lengths) * 2 * self.sizes[0]


class HostKV(KVBuffers):
    """numpy buffers grown in steps of ``step`` entries; new entries are written in place.

    A subclass may keep the same layout in another array library (``_alloc``,
    ``_alloc_positions`` and ``_positions``; e.g. torch tensors on a GPU)."""

    step = 256

    def __init__(self, num_layers: int, n_kv: int, head_dim: int, dtype):
        super().__init__(num_layers, n_kv, head_dim, dtype)
        self.keys = [self._alloc(0) for _ in range(num_layers)]
        self.values = [self._alloc(0) for _ in range(num_layers)]
        self.positions = [self._alloc_positions(0) for _ in range(num_layers)]

    def _alloc(self, n: int) -> np.ndarray:
        return np.zeros((n, self.n_kv, self.head_dim), self.dtype)

    def _alloc_positions(self, n: int) -> np.ndarray:
        return np.zeros(n, np.int32)

    def reserve(self, slots: list[int]) -> None:
        for l, s in enumerate(slots):
            need, n = self.lengths[l] + s, self.lengths[l]
            if need <= self.keys[l].shape[0]:
                continue
            cap = -(-need // self.step) * self.step
            for store in (self.keys, self.values):
                grown = self._alloc(cap)
                grown[:n] = store[l][:n]
                store[l] = grown
            pos = self._alloc_positions(cap)
            pos[:n] = self.positions[l][:n]
            self.positions[l] = pos

    def arrays(self, l: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.keys[l], self.values[l], self.positions[l]

    def past(self, l: int) -> tuple[int, int, int]:
        return tuple(a.ctypes.data for a in self.arrays(l))

    def new(self, l: int, count: int) -> tuple[int, int, int]:
        n = self.lengths[l]
        return tuple(a.ctypes.data + n * a.strides[0] for a in self.arrays(l))

    def windows(self, l: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views ``[1, length + count, n_kv, D]`` (keys, values) and ``[1, length + count]``
        (positions): layer ``l``'s live entries and the ``count`` after them, where a chunk's new
        entries go (an eager decoder writes them there and reads the whole window)."""
        n = self.lengths[l] + count
        return tuple(a[None, :n] for a in self.arrays(l))

    def _positions(self, l: int, n: int) -> np.ndarray:
        return self.positions[l][:n]

    @staticmethod
    def _clone(a):
        return a.copy()

    def snapshot(self) -> list[tuple]:
        """Copies of every layer's live keys, values and positions (a saved context)."""
        return [tuple(self._clone(a[:n]) for a in self.arrays(l)) for l, n in enumerate(self.lengths)]

    def restore(self, layers: list[tuple], upto: int | None = None) -> None:
        """Make :meth:`snapshot`'s ``layers`` the live entries (copied in), only those at positions
        ``< upto`` where given."""
        if upto is not None:
            layers = [tuple(a[p < upto] for a in (k, v, p)) for k, v, p in layers]
        self.reset()
        self.reserve([len(p) for _, _, p in layers])
        for l, entries in enumerate(layers):
            for store, a in zip(self.arrays(l), entries):
                store[:len(a)] = a
        self.lengths = [len(p) for _, _, p in layers]


class DeviceKV(KVBuffers):
    """Device buffers of ``capacities[l]`` entries per layer, allocated once; aligned scratch where needed.

    A backend supplies the memory operations: ``_alloc(nbytes)`` (an object with an aligned
    ``ptr`` and its ``nbytes``, kept alive by this class), ``_copy([(dst, src, nbytes), ...])``
    on the device, in stream order before the next run, and ``_read(buf, host_array)`` (the
    first bytes of an allocation: positions, on request).
    """

    def __init__(self, num_layers: int, n_kv: int, head_dim: int, dtype, capacities: list[int]):
        super().__init__(num_layers, n_kv, head_dim, dtype)
        self.capacity = list(capacities)
        self.store = [[self._aligned(c * size) for size in self.sizes] for c in self.capacity]
        self._scratch: dict[tuple[int, int], object] = {}
        self._pending: list[tuple[int, int, int]] = []  # (layer, tensor, scratch address)

    def _aligned(self, nbytes: int):
        buf = self._alloc(max(int(nbytes), ALIGN))
        if buf.ptr % ALIGN:
            raise RuntimeError(f"device allocation at {buf.ptr:#x} is not {ALIGN}-byte aligned")
        return buf

    def reserve(self, slots: list[int]) -> None:
        for l, (n, s) in enumerate(zip(self.lengths, slots)):
            if n + s > self.capacity[l]:  # cannot happen within max_context (checked before)
                raise RuntimeError(f"layer {l}'s KV buffer of {self.capacity[l]} entries is full")
        self._pending = []

    def past(self, l: int) -> tuple[int, int, int]:
        return tuple(buf.ptr for buf in self.store[l])

    def new(self, l: int, count: int) -> tuple[int, int, int]:
        out = []
        for j, size in enumerate(self.sizes):
            addr = self.store[l][j].ptr + self.lengths[l] * size
            if addr % ALIGN:
                scratch = self._scratch.get((l, j))
                if scratch is None or scratch.nbytes < count * size:
                    scratch = self._scratch[(l, j)] = self._aligned(count * size)
                self._pending.append((l, j, scratch.ptr))
                addr = scratch.ptr
            out.append(addr)
        return tuple(out)

    def commit(self, live: list[int]) -> None:
        copies = [(self.store[l][j].ptr + self.lengths[l] * self.sizes[j], src, live[l] * self.sizes[j])
                  for l, j, src in self._pending if live[l]]
        if copies:
            self._copy(copies)
        self._pending = []
        super().commit(live)

    def _positions(self, l: int, n: int) -> np.ndarray:
        out = np.empty(n, np.int32)
        if n:
            self._read(self.store[l][2], out)
        return out

    def _alloc(self, nbytes: int):
        raise NotImplementedError

    def _copy(self, copies: list[tuple[int, int, int]]) -> None:
        raise NotImplementedError

    def _read(self, buf, out: np.ndarray) -> None:
        raise NotImplementedError
