"""``pmod.open_engine(dir, backend="trt")``: the engines ``pmod trt build`` wrote, run by TensorRT.

The logic is ONNX Runtime's (``pmod_export.ort_engine``, docs/EXPORT.md) on TensorRT's
name-based API:

* The KV cache never leaves the GPU. Layer ``l`` owns device buffers for keys and values
  ``[cap_l, n_kv, D]`` and positions ``[cap_l]`` (int32), sequence-major, so the live prefix
  is one block. Each run binds the live prefix as ``past_*`` (``[1, P_l, ...]``) and the
  space right after it as ``new_*`` (``[1, S_l, ...]``): the engine reads the cache in place
  and writes the chunk's entries in place; the layer's length then grows by its live count
  (text + kept vision), so the dead tail is overwritten by the next chunk and the cache
  holds exactly the kept tokens. ``cap_l = max_context + C_l`` (the longest live prefix plus
  one chunk's slots: a MoD layer's buffer is smaller than a dense layer's).
* What crosses between host and device per step is what the engine API forces: the chunk's
  embeddings and positions in, the logits ``[V]`` out (float32, into a preallocated host
  array). Positions are copied to the host only when ``kept_positions()`` asks.
* One CUDA stream; every call ends with one synchronisation (to hand back numpy logits).
* Each engine has one execution context; the decode engine's two profiles (``step`` for
  one token, ``chunk`` for longer text) are switched only when a call needs the other one.

CUDA memory and streams come from :mod:`pmod_trt.cuda` (cuda-python).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pmod.engine import Engine, _normalize_inputs
from pmod.errors import PmodError

from . import cuda, deps
from pmod.chunk import live_lengths, split_chunk
from .manifest import MANIFEST, check_compatible, read_engine_manifest
from .profiles import select_profile

_WHAT = "the trt backend"
_REBUILD = "rebuild it with 'pmod trt build --onnx EXPORT_DIR --out DIR'"
#: TensorRT DataType member names -> numpy names (as in the manifests).
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
          "BOOL": "bool", "INT8": "int8", "UINT8": "uint8", "DOUBLE": "float64"}


def kv_names(layer: int, prefix: str) -> list[str]:
    """``past_key_l, past_value_l, past_positions_l`` (prefix ``past``) or ``new_*`` (docs/EXPORT.md)."""
    return [f"{prefix}_key_{layer}", f"{prefix}_value_{layer}", f"{prefix}_positions_{layer}"]


def dtype_name(dt) -> str:
    name = getattr(dt, "name", None) or str(dt).rsplit(".", 1)[-1]
    return DTYPES.get(name, name)


def check_engine_io(trt, engine, spec, file: Path) -> None:
    """Refuse an engine whose I/O tensors (names, direction, dtype, rank, fixed dims) differ from the manifest."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
    for side, want, got in (("input", spec.inputs, inputs), ("output", spec.outputs, set(names) - inputs)):
        listed = {t.name for t in want}
        if listed != got:
            diff = sorted(listed ^ got)[0]
            raise PmodError(f"{file} does not match {MANIFEST}: {side} '{diff}' is "
                            f"{'missing from the engine' if diff in listed else 'not in the manifest'}; {_REBUILD}")
        for t in want:
            if side == "input" and engine.is_shape_inference_io(t.name):  # would need a host address
                raise PmodError(f"{file}: TensorRT made input '{t.name}' a shape tensor; the exported graphs take "
                                f"none (check the export with 'pmod export lint'), then {_REBUILD}")
            dt, shape = dtype_name(engine.get_tensor_dtype(t.name)), [int(d) for d in engine.get_tensor_shape(t.name)]
            fixed_ok = len(shape) == len(t.shape) and all(
                not isinstance(a, int) or b < 0 or a == b for a, b in zip(t.shape, shape))
            if dt != t.dtype or not fixed_ok:
                raise PmodError(f"{file} does not match {MANIFEST}: {side} '{t.name}' is {dt} {shape} in the engine, "
                                f"{t.dtype} {t.shape} in the manifest; {_REBUILD}")


class DeviceKV:
    """Per-layer KV buffers on the GPU: keys, values ``[cap_l, n_kv, D]``, positions ``[cap_l]`` int32."""

    def __init__(self, n_kv: int, head_dim: int, dtype, capacities: list[int]):
        self.n_kv, self.head_dim, self.dtype = n_kv, head_dim, np.dtype(dtype)
        self.entry = n_kv * head_dim * self.dtype.itemsize  # bytes of one entry of keys (or values)
        self.capacity = list(capacities)
        self.keys = [cuda.DeviceBuffer(c * self.entry) for c in capacities]
        self.values = [cuda.DeviceBuffer(c * self.entry) for c in capacities]
        self.positions = [cuda.DeviceBuffer(c * 4) for c in capacities]
        self.lengths = [0] * len(capacities)

    def addresses(self, l: int, offset: int) -> tuple[int, int, int]:
        """Device addresses of entry ``offset`` of layer ``l``'s keys, values and positions."""
        return (self.keys[l].ptr + offset * self.entry, self.values[l].ptr + offset * self.entry,
                self.positions[l].ptr + offset * 4)

    def reserve(self, slots: list[int]) -> None:
        for l, (n, s) in enumerate(zip(self.lengths, slots)):
            if n + s > self.capacity[l]:  # cannot happen within max_context (checked before)
                raise PmodError(f"layer {l}'s KV buffer of {self.capacity[l]} entries is full; "
                                "re-export with a larger --max-context and rebuild")

    def advance(self, live: list[int]) -> None:
        self.lengths = [n + k for n, k in zip(self.lengths, live)]

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)

    def held_positions(self, stream: cuda.Stream) -> list[np.ndarray]:
        out = [np.empty(n, np.int32) for n in self.lengths]
        for buf, host in zip(self.positions, out):
            cuda.to_host(host, buf.ptr, stream)
        stream.synchronize()
        return [np.sort(p) for p in out]

    @property
    def nbytes(self) -> int:
        """Bytes of the live K and V entries (not the spare capacity)."""
        return sum(self.lengths) * 2 * self.entry

    def free(self) -> None:
        for b in self.keys + self.values + self.positions:
            b.free()


class TrtEngine(Engine):
    def __init__(self, path, dtype: str | None = None, dense: bool = False, retention: float | None = None):
        trt = deps.tensorrt(_WHAT)
        self.path = Path(path)
        m = read_engine_manifest(self.path)
        if dtype is not None and dtype != m.dtype:
            raise PmodError(f"{self.path} holds {m.precision} engines with {m.dtype} inputs and caches; for {dtype} "
                            "re-export and rebuild (or drop --dtype)")
        if retention is not None and retention != m.retention:
            raise PmodError(f"{self.path} was built at retention {m.retention:g} (its capacities are static); for "
                            f"{retention:g} re-export with 'pmod export onnx --retention {retention:g}' and rebuild "
                            "(or drop --retention)")
        check_compatible(m, self.path, trt.__version__, cuda.gpu_info(_WHAT))
        self.manifest = m
        self.retention = m.retention
        self.dense = dense  # every chunk through the decode engine: the plain-LLaVA twin, routers unused
        self.max_vision, self.max_context = m.max_vision_tokens, m.max_context
        self.config = dataclasses.replace(m.pmod_config, max_position_embeddings=m.max_context)
        self.np_dtype = np.dtype(m.dtype)
        self._stream = cuda.Stream()
        log = deps.logger(trt)
        self._runtime = trt.Runtime(log)
        self._engines, self._contexts, self._active = {}, {}, {}
        for name, spec in m.engines.items():
            file = self.path / spec.file
            del log.errors[:]
            engine = self._runtime.deserialize_cuda_engine(file.read_bytes())
            if engine is None:
                why = log.errors[-1] if log.errors else "no error was logged"
                raise PmodError(f"TensorRT cannot load {file} ({why}); {_REBUILD}")
            check_engine_io(trt, engine, spec, file)
            context = engine.create_execution_context()
            if context is None:
                raise PmodError(f"TensorRT cannot create an execution context for {file} (out of GPU memory?)")
            self._engines[name], self._contexts[name], self._active[name] = engine, context, 0
        c = self.config
        extra = m.capacities if self.max_vision else [0] * c.num_hidden_layers
        self.cache = DeviceKV(c.num_key_value_heads, c.head_dim, self.np_dtype, [self.max_context + e for e in extra])
        self._scratch: dict[str, cuda.DeviceBuffer] = {}
        self._logits = np.empty((1, c.vocab_size), np.float32)
        self._position = 0

    # ------------------------------------------------------------------ context
    def check_room(self, n_new: int) -> None:
        if self.position + n_new > self.max_context:
            raise PmodError(
                f"prompt too long: {self.position + n_new} tokens exceed the exported context of "
                f"{self.max_context} tokens; shorten the prompt or re-export with a larger --max-context and rebuild")

    @property
    def position(self) -> int:
        return self._position

    def kv_lengths(self) -> list[int]:
        return list(self.cache.lengths)

    def kept_positions(self) -> list[np.ndarray]:
        return self.cache.held_positions(self._stream)

    def kv_bytes(self) -> int:
        return self.cache.nbytes

    def reset(self) -> None:
        self.cache.reset()
        self._position = 0

    # ------------------------------------------------------------------ running
    def prefill(self, input_ids=None, inputs_embeds=None, vision_mask=None) -> np.ndarray:
        ids, emb, mask = _normalize_inputs(input_ids, inputs_embeds, vision_mask, self.config.hidden_size)
        self.check_room(mask.shape[0])
        emb = self.embed(ids) if emb is None else np.asarray(emb, dtype=np.float32)
        if self.dense:
            mask = np.zeros_like(mask)
        chunk = split_chunk(emb.astype(self.np_dtype), mask, self._position, self.max_vision,
                            then=" and rebuild the engines")
        graph = "prefill" if chunk.n_vision else "decode"
        extra = self.manifest.capacities if chunk.n_vision else [0] * len(self.cache.lengths)
        slots = [chunk.text_len + e for e in extra]
        self.cache.reserve(slots)
        logits = self._buffer("logits", self._logits.nbytes)
        self._run(graph, chunk.feeds(), {"logits": logits.ptr}, slots)
        cuda.to_host(self._logits, logits.ptr, self._stream)
        self._stream.synchronize()
        self.cache.advance(live_lengths(self.config, chunk, self.retention))
        self._position += chunk.length
        return self._logits[0].copy()

    def decode(self, token_id: int) -> np.ndarray:
        return self.prefill(input_ids=np.array([int(token_id)], dtype=np.int32))

    def embed(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        V, H = self.config.vocab_size, self.config.hidden_size
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise PmodError(f"token ids must be in [0, {V}), got {int(ids.min())}..{int(ids.max())}")
        if ids.size == 0:
            return np.zeros((0, H), np.float32)
        out = np.empty((1, ids.size, H), self.np_dtype)
        return self._run_to_host("embed", {"input_ids": ids.astype(np.int32)[None]}, "inputs_embeds", out)[0]

    def encode_image(self, image) -> np.ndarray:
        if "vision" not in self.manifest.engines:
            raise PmodError(f"{self.path} has no vision engine (the model has no vision tower), so it cannot "
                            "encode images: export a checkpoint that carries one")
        spec = self.manifest.engines["vision"].inputs[0]
        pixels = np.asarray(image.pixel_values)
        if pixels.ndim != 4 or list(pixels.shape[1:]) != list(spec.shape[1:]):
            raise PmodError(f"pixel_values have shape {tuple(pixels.shape)}; the vision engine expects "
                            f"[N, {', '.join(str(d) for d in spec.shape[1:])}] (NCHW)")
        index = np.asarray(image.feature_index(), dtype=np.int32)
        out = np.empty((index.size, self.config.hidden_size), self.np_dtype)
        return self._run_to_host("vision", {"pixel_values": pixels.astype(self.np_dtype), "feature_index": index},
                                 "image_features", out)

    def _run_to_host(self, graph: str, feeds: dict, output: str, out: np.ndarray) -> np.ndarray:
        buf = self._buffer(output, out.nbytes)
        self._run(graph, feeds, {output: buf.ptr})
        cuda.to_host(out, buf.ptr, self._stream)
        self._stream.synchronize()
        return out.astype(np.float32)

    def _buffer(self, name: str, nbytes: int) -> cuda.DeviceBuffer:
        """A device buffer of at least ``nbytes`` for input/output ``name``, reused across calls."""
        buf = self._scratch.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()  # nothing in flight: every call ends synchronised
            buf = self._scratch[name] = cuda.DeviceBuffer(max(nbytes, 2 * (buf.nbytes if buf else 0)))
        return buf

    def _run(self, graph: str, feeds: dict, outputs: dict[str, int], slots: list[int] | None = None) -> None:
        """Run ``graph`` on ``feeds`` (host arrays), writing ``outputs`` (name -> device address).

        With ``slots`` (decoder graphs) the cache is bound in place: ``past_*`` = each layer's
        live prefix, ``new_*`` = the ``slots[l]`` entries right after it.
        """
        spec, ctx, kv = self.manifest.engines[graph], self._contexts[graph], self.cache
        feeds = {name: np.ascontiguousarray(a) for name, a in feeds.items()}
        shapes = {name: tuple(a.shape) for name, a in feeds.items()}
        dims = [kv.n_kv, kv.head_dim]
        if slots is not None:
            for l, n in enumerate(kv.lengths):
                k, v, p = kv_names(l, "past")
                shapes.update({k: (1, n, *dims), v: (1, n, *dims), p: (1, n)})
        index = select_profile(spec.profiles, shapes)
        if index is None:
            raise PmodError(self._outside(graph, shapes))
        if index != self._active[graph]:
            if not ctx.set_optimization_profile_async(index, self._stream.ptr):
                raise PmodError(f"TensorRT cannot switch the {graph} engine to profile {index}; {_REBUILD}")
            self._active[graph] = index
        for name, a in feeds.items():
            buf = self._buffer(name, a.nbytes)
            cuda.to_device(buf.ptr, a, self._stream)
            self._bind(ctx, name, buf.ptr, a.shape)
        if slots is not None:
            for l, s in enumerate(slots):
                n = kv.lengths[l]
                for past, new, live, free, tail in zip(kv_names(l, "past"), kv_names(l, "new"), kv.addresses(l, 0),
                                                       kv.addresses(l, n), (dims, dims, [])):
                    self._bind(ctx, past, live, (1, n, *tail))  # the live prefix, read in place
                    self._address(ctx, new, free)  # the chunk's entries, written right after it
            for l, s in enumerate(slots):  # output shapes are known once every input shape is set
                got = tuple(int(d) for d in ctx.get_tensor_shape(f"new_key_{l}"))
                if got != (1, s, *dims):  # the buffer has room for exactly s entries
                    raise PmodError(f"the {graph} engine would write {got} for layer {l}'s new keys, expected "
                                    f"{(1, s, *dims)}; {_REBUILD}")
        for name, ptr in outputs.items():
            self._address(ctx, name, ptr)
        if not ctx.execute_async_v3(self._stream.ptr):
            raise PmodError(f"TensorRT failed to run the {graph} engine; check the log above, or {_REBUILD}")

    @staticmethod
    def _bind(ctx, name: str, ptr: int, shape) -> None:
        if not ctx.set_input_shape(name, tuple(int(d) for d in shape)):
            raise PmodError(f"TensorRT refuses shape {tuple(shape)} for input '{name}'; {_REBUILD}")
        TrtEngine._address(ctx, name, ptr)

    @staticmethod
    def _address(ctx, name: str, ptr: int) -> None:
        if not ctx.set_tensor_address(name, int(ptr)):
            raise PmodError(f"TensorRT refuses the address of '{name}'; {_REBUILD}")

    def _outside(self, graph: str, shapes: dict) -> str:
        """One line naming the first input whose shape no profile of ``graph`` accepts."""
        profiles = self.manifest.engines[graph].profiles
        for name, shape in shapes.items():
            ranges = [p.shapes[name] for p in profiles if name in p.shapes]
            if ranges and not any(all(a <= x <= b for a, x, b in zip(lo, shape, hi)) for lo, _, hi in ranges):
                allowed = " or ".join(
                    "[" + ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi)) + "]"
                    for lo, _, hi in ranges)
                return (f"input '{name}' of the {graph} engine has shape {list(shape)}, outside what it was built "
                        f"for ({allowed}); re-export with larger limits and rebuild")
        return f"no optimisation profile of the {graph} engine accepts shapes {shapes}; {_REBUILD}"

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Release the contexts, engines, buffers and stream (also done when the engine is collected)."""
        self._contexts = {}
        self._engines = {}
        self._runtime = None
        for buf in getattr(self, "_scratch", {}).values():
            buf.free()
        self._scratch = {}
        if getattr(self, "cache", None) is not None:
            self.cache.free()
        if getattr(self, "_stream", None) is not None:
            self._stream.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
