"""``pmod.open_engine(dir, backend="trt")``: the engines ``pmod trt build`` wrote, run by TensorRT.

What the static engines share (chunk plan, context, KV bookkeeping, argument checks) is
:class:`pmod.static.engine.StaticEngine`; this module runs engines on TensorRT's name-based
API:

* The KV cache never leaves the GPU (:class:`CudaKV`, a :class:`pmod.static.cache.DeviceKV`
  in cudaMalloc memory). Each run binds every layer's live prefix as ``past_*`` and the place
  for its new entries as ``new_*``: right after the prefix where that address is 256-byte
  aligned (TensorRT requires it of every tensor address), else aligned scratch whose live
  entries are then copied after the prefix on the device, in stream order.
* Context memory is user-managed: before each run the engine asks TensorRT what the current
  shapes need (``update_device_memory_size_for_shapes``) and hands it that much of one growing
  buffer, so memory follows the shapes used, not the profile maxima (docs/TENSORRT.md).
* What crosses between host and device per step is what the engine API forces: the chunk's
  embeddings, positions and carriers in, the logits ``[V]`` out (float32, into a
  preallocated host array). Positions are copied to the host only when ``kept_positions()`` asks.
* One CUDA stream; every call ends with one synchronisation (to hand back numpy logits).
* Each engine has one execution context; the profiles of a graph (``first``/``later`` for
  prefill, ``step``/``chunk`` for decode) are switched only when a call needs another one.

CUDA memory and streams come from :mod:`pmod_trt.cuda` (cuda-python).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pmod.errors import PmodError
from pmod.static.cache import DeviceKV
from pmod.static.chunk import Step
from pmod.static.engine import StaticEngine
from pmod.static.manifest import FIX, ENGINE_FORMAT, MANIFEST, check_io

from . import cuda, deps
from .manifest import check_compatible, read_engine_manifest
from .profiles import select_profile

_WHAT = "the trt backend"
_REBUILD = FIX[ENGINE_FORMAT]
#: TensorRT DataType member names -> numpy names (as in the manifests).
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
          "BOOL": "bool", "INT8": "int8", "UINT8": "uint8", "DOUBLE": "float64"}


def dtype_name(dt) -> str:
    name = getattr(dt, "name", None) or str(dt).rsplit(".", 1)[-1]
    return DTYPES.get(name, name)


def check_engine_io(trt, engine, spec, file: Path) -> None:
    """Refuse an engine whose I/O tensors (names, direction, dtype, rank, fixed dims) differ from the
    manifest, or that made an input a shape tensor (it would need a host address)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    io = [(n, dtype_name(engine.get_tensor_dtype(n)), [int(d) for d in engine.get_tensor_shape(n)]) for n in names]
    inputs = [t for t in io if engine.get_tensor_mode(t[0]) == trt.TensorIOMode.INPUT]
    check_io(file.parent / MANIFEST, spec, inputs, [t for t in io if t not in inputs], _REBUILD, ordered=False)
    for name, _, _ in inputs:
        if engine.is_shape_inference_io(name):
            raise PmodError(f"{file}: TensorRT made input '{name}' a shape tensor; the exported graphs take "
                            f"none (check the export with 'pmod export lint'), then {_REBUILD}")


class CudaKV(DeviceKV):
    """:class:`~pmod.static.cache.DeviceKV` in cudaMalloc memory, copies on the engine's stream."""

    def __init__(self, num_layers, n_kv, head_dim, dtype, capacities: list[int], stream: cuda.Stream):
        self.stream = stream
        super().__init__(num_layers, n_kv, head_dim, dtype, capacities)

    def _alloc(self, nbytes: int) -> cuda.DeviceBuffer:
        return cuda.DeviceBuffer(nbytes)

    def _copy(self, copies) -> None:
        for dst, src, nbytes in copies:
            cuda.on_device(dst, src, nbytes, self.stream)

    def _read(self, buf: cuda.DeviceBuffer, out: np.ndarray) -> None:
        cuda.to_host(out, buf.ptr, self.stream)
        self.stream.synchronize()

    def free(self) -> None:
        for b in [b for layer in self.store for b in layer] + list(self._scratch.values()):
            b.free()


class TrtEngine(StaticEngine):
    redo = " and rebuild the engines"
    device = "cuda"

    def __init__(self, path, dtype: str | None = None, dense: bool = False, retention: float | None = None):
        trt = deps.tensorrt(_WHAT)
        m = read_engine_manifest(path)
        self._open(path, m, dtype, retention, dense)
        check_compatible(m, self.path, trt.__version__, cuda.gpu_info(_WHAT))
        self._stream = cuda.Stream()
        log = deps.logger(trt)
        self._runtime = trt.Runtime(log)
        self._engines, self._contexts, self._active = {}, {}, {}
        user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        for name, spec in m.graphs.items():
            file = self.path / spec.file
            del log.errors[:]
            engine = self._runtime.deserialize_cuda_engine(file.read_bytes())
            if engine is None:
                why = log.errors[-1] if log.errors else "no error was logged"
                raise PmodError(f"TensorRT cannot load {file} ({why}); {_REBUILD}")
            check_engine_io(trt, engine, spec, file)
            context = engine.create_execution_context(user_managed)
            if context is None:
                raise PmodError(f"TensorRT cannot create an execution context for {file} (out of GPU memory?)")
            self._engines[name], self._contexts[name], self._active[name] = engine, context, 0
        c = self.config
        self.cache = CudaKV(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.np_dtype,
                            self.kv_capacity(), self._stream)
        self._scratch: dict[str, cuda.DeviceBuffer] = {}
        self._logits = np.empty((1, c.vocab_size), np.float32)

    def matmul_probe(self, n: int):
        return None  # TensorRT runs whole engines only; no single-matmul probe here

    # ------------------------------------------------------------------ running
    def _run_decoder(self, step: Step) -> np.ndarray:
        logits = self._buffer("logits", self._logits.nbytes)
        self._run(step.graph, step.feeds, {"logits": logits.ptr}, step.slots)
        cuda.to_host(self._logits, logits.ptr, self._stream)
        self._stream.synchronize()
        return self._logits[0].copy()

    def _run_embed(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((1, ids.shape[1], self.config.hidden_size), self.np_dtype)
        return self._run_to_host("embed", {"input_ids": ids}, "inputs_embeds", out)

    def _run_vision(self, pixels: np.ndarray, index: np.ndarray) -> np.ndarray:
        out = np.empty((index.size, self.config.hidden_size), self.np_dtype)
        return self._run_to_host("vision", {"pixel_values": pixels, "feature_index": index}, "image_features", out)

    def _run_to_host(self, graph: str, feeds: dict, output: str, out: np.ndarray) -> np.ndarray:
        buf = self._buffer(output, out.nbytes)
        self._run(graph, feeds, {output: buf.ptr})
        cuda.to_host(out, buf.ptr, self._stream)
        self._stream.synchronize()
        return out

    def _buffer(self, name: str, nbytes: int) -> cuda.DeviceBuffer:
        """A device buffer of at least ``nbytes`` for ``name``, reused across calls."""
        buf = self._scratch.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()  # nothing in flight: every call ends synchronised
            buf = self._scratch[name] = cuda.DeviceBuffer(max(nbytes, 2 * (buf.nbytes if buf else 0)))
        return buf

    def _run(self, graph: str, feeds: dict, outputs: dict[str, int], slots: list[int] | None = None) -> None:
        """Run ``graph`` on ``feeds`` (host arrays), writing ``outputs`` (name -> device address).

        With ``slots`` (decoder graphs) the cache is bound in place (``self.cache.bindings``).
        """
        spec, ctx = self.manifest.graphs[graph], self._contexts[graph]
        feeds = {name: np.ascontiguousarray(a) for name, a in feeds.items()}
        kv = list(self.cache.bindings(slots)) if slots is not None else []
        shapes = {name: tuple(a.shape) for name, a in feeds.items()}
        shapes.update({name: tuple(shape) for name, shape, _, _, output in kv if not output})
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
        for name, shape, _, addr, output in kv:
            if not output:
                self._bind(ctx, name, addr, shape)  # a live prefix, read in place
        for name, shape, _, addr, output in kv:  # output shapes are known once every input shape is set
            if output:
                got = [int(d) for d in ctx.get_tensor_shape(name)]
                if got != shape:  # the place bound has room for exactly these entries
                    raise PmodError(f"the {graph} engine would write {got} for '{name}', expected {shape}; {_REBUILD}")
                self._address(ctx, name, addr)
        for name, ptr in outputs.items():
            self._address(ctx, name, ptr)
        memory = self._buffer("context memory", ctx.update_device_memory_size_for_shapes())
        ctx.set_device_memory(memory.ptr, memory.nbytes)
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
        profiles = self.manifest.graphs[graph].profiles
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
