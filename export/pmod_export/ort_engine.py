"""``pmod.open_engine(dir, backend="onnx")``: the exported graphs run by ONNX Runtime.

``dir`` is a directory written by ``pmod export onnx``; its manifest is checked against
the files and against each graph's inputs and outputs before anything runs.

KV cache without round trips: every layer's keys, values and positions live in one buffer
per layer (``pmod_export.cache``) on the session's device: numpy arrays on the CPU,
``OrtValue`` buffers of ``max_context + N`` entries on CUDA. Each run binds, through
``IOBinding`` raw pointers, the live prefix as ``past_*`` and the free space right after it
as ``new_*``, so the graph reads the cache in place and writes the new entries in place:
nothing is copied between steps, on either device. The only per-step transfers are what
the engine API forces: the chunk's embeddings and positions in, the logits ``[V]`` out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pmod.engine import Engine, _normalize_inputs
from pmod.errors import PmodError

from .cache import KVCache
from pmod.chunk import live_lengths, split_chunk
from .manifest import MANIFEST, check_io, read_manifest
from .onnx_export import kv_names

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(double)": "float64",
              "tensor(bfloat16)": "bfloat16"}


class DeviceKVCache(KVCache):
    """``OrtValue`` buffers allocated once at full size on the session's device (e.g. CUDA)."""

    def __init__(self, num_layers, n_kv, head_dim, dtype, capacity: int, device: str):
        import onnxruntime as ort

        self.n_kv, self.head_dim, self.dtype, self.device = n_kv, head_dim, np.dtype(dtype), device
        alloc = ort.OrtValue.ortvalue_from_shape_and_type
        self.keys = [alloc([capacity, n_kv, head_dim], self.dtype.type, device, 0) for _ in range(num_layers)]
        self.values = [alloc([capacity, n_kv, head_dim], self.dtype.type, device, 0) for _ in range(num_layers)]
        self.positions = [alloc([capacity], np.int32, device, 0) for _ in range(num_layers)]
        self.capacity = capacity
        self.lengths = [0] * num_layers

    def _host_positions(self) -> list:
        return [p.numpy() for p in self.positions]

    def reserve(self, slots: list[int]) -> None:
        for n, s in zip(self.lengths, slots):
            if n + s > self.capacity:  # cannot happen within max_context (checked before)
                raise PmodError(f"KV buffer of {self.capacity} entries is full; re-export with a larger --max-context")


def _pointer(buf, offset: int) -> int:
    """Address of entry ``offset`` of a cache buffer (numpy array or OrtValue)."""
    if isinstance(buf, np.ndarray):
        return buf.ctypes.data + offset * buf.strides[0]
    per_entry = buf.tensor_size_in_bytes() // buf.shape()[0]
    return buf.data_ptr() + offset * per_entry


class OrtEngine(Engine):
    def __init__(self, path, dtype: str | None = None, dense: bool = False, providers=None,
                 device_kv: bool | None = None, threads: int | None = None, retention: float | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        m = read_manifest(self.path)
        if dtype is not None and dtype != m.dtype:
            raise PmodError(f"{self.path} was exported in {m.dtype}; for {dtype} re-export with "
                            f"'pmod export onnx --dtype {dtype}' (or drop --dtype)")
        if retention is not None and retention != m.retention:
            raise PmodError(f"{self.path} was exported at retention {m.retention:g} (its capacities are static); "
                            f"for {retention:g} re-export with 'pmod export onnx --retention {retention:g}' "
                            "(or drop --retention)")
        self.retention = m.retention
        self.manifest = m
        self.dense = dense  # every chunk through the text graph: the plain-LLaVA twin, routers unused
        self.max_vision = m.max_vision_tokens
        self.max_context = m.max_context
        # The context this export serves: generation and check_room read it from the config.
        self.config = dataclasses.replace(m.pmod_config, max_position_embeddings=m.max_context)
        self.np_dtype = np.dtype(m.dtype)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # Memory patterns pre-plan one block for every intermediate of a run at the shapes
        # seen; without them buffers are reused as they free. On next-proxy (2880 vision
        # tokens) this took the p-MoD peak from 3.3 to 2.7 GiB, at the same speed.
        opts.enable_mem_pattern = False
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.sessions = {}
        for name, spec in m.graphs.items():
            file = self.path / spec.file
            try:
                sess = ort.InferenceSession(str(file), opts, providers=list(providers))
            except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PmodError(f"onnxruntime cannot load {file} ({first}); re-export it with 'pmod export onnx'") from None
            check_io(self.path / MANIFEST, name, spec,
                     [(i.name, _ORT_TYPES.get(i.type, i.type), i.shape) for i in sess.get_inputs()],
                     [(o.name, _ORT_TYPES.get(o.type, o.type), o.shape) for o in sess.get_outputs()])
            self.sessions[name] = sess
        decode = self.sessions["decode"]
        self.device = "cuda" if decode.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        c = self.config
        L, n_kv, D = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
        if device_kv if device_kv is not None else self.device != "cpu":
            # the longest live prefix plus one chunk's dead tail
            self.cache = DeviceKVCache(L, n_kv, D, self.np_dtype, self.max_context + self.max_vision, self.device)
        else:
            self.cache = KVCache(L, n_kv, D, self.np_dtype, capacity=KVCache.step)
        self._logits = np.empty((1, c.vocab_size), np.float32)
        self._position = 0

    # ------------------------------------------------------------------ context
    def check_room(self, n_new: int) -> None:
        if self.position + n_new > self.max_context:
            raise PmodError(
                f"prompt too long: {self.position + n_new} tokens exceed the exported context of "
                f"{self.max_context} tokens; shorten the prompt or re-export with a larger --max-context")

    @property
    def position(self) -> int:
        return self._position

    def kv_lengths(self) -> list[int]:
        return list(self.cache.lengths)

    def kept_positions(self) -> list[np.ndarray]:
        return self.cache.held_positions()

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
        chunk = split_chunk(emb.astype(self.np_dtype), mask, self._position, self.max_vision)
        graph = "prefill" if chunk.n_vision else "decode"
        extra = self.manifest.capacities if chunk.n_vision else [0] * len(self.cache.lengths)
        slots = [chunk.text_len + e for e in extra]
        self.cache.reserve(slots)
        self._run(graph, chunk.feeds(), slots)
        self.cache.advance(live_lengths(self.config, chunk, self.retention))
        self._position += chunk.length
        return self._logits[0].copy()

    def _run(self, graph: str, feeds: dict, slots: list[int]) -> None:
        """Run ``graph`` with the cache bound in place: ``past_*`` = live prefix, ``new_*`` = right after it."""
        sess, c = self.sessions[graph], self.cache
        b = sess.io_binding()
        feeds = {name: np.ascontiguousarray(a) for name, a in feeds.items()}  # alive until the run ends
        for name, a in feeds.items():
            b.bind_cpu_input(name, a)
        dev = c.device if isinstance(c, DeviceKVCache) else "cpu"
        kv, dt = [c.n_kv, c.head_dim], self.np_dtype.type
        for l, s in enumerate(slots):
            n = c.lengths[l]
            for past, new, buf, dims, et in zip(kv_names(l, "past"), kv_names(l, "new"),
                                                (c.keys[l], c.values[l], c.positions[l]), (kv, kv, []),
                                                (dt, dt, np.int32)):
                b.bind_input(past, dev, 0, et, [1, n] + dims, _pointer(buf, 0))
                b.bind_output(new, dev, 0, et, [1, s] + dims, _pointer(buf, n))
        b.bind_output("logits", "cpu", 0, np.float32, list(self._logits.shape), self._logits.ctypes.data)
        try:
            sess.run_with_iobinding(b)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PmodError(f"onnxruntime failed on {graph} ({first}); check the export with 'pmod export lint'") from None

    def decode(self, token_id: int) -> np.ndarray:
        return self.prefill(input_ids=np.array([int(token_id)], dtype=np.int32))

    def embed(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        V = self.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise PmodError(f"token ids must be in [0, {V}), got {int(ids.min())}..{int(ids.max())}")
        out = self.sessions["embed"].run(None, {"input_ids": ids.astype(np.int32)[None]})[0]
        return out[0].astype(np.float32)

    def encode_image(self, image) -> np.ndarray:
        if "vision" not in self.sessions:
            raise PmodError(f"{self.path} has no vision graph (the model has no vision tower), so it cannot "
                            "encode images: export a checkpoint that carries one")
        spec = self.manifest.graphs["vision"].inputs[0]
        pixels = np.asarray(image.pixel_values)
        if pixels.ndim != 4 or list(pixels.shape[1:]) != list(spec.shape[1:]):
            raise PmodError(f"pixel_values have shape {tuple(pixels.shape)}; the vision graph expects "
                            f"[N, {', '.join(str(d) for d in spec.shape[1:])}] (NCHW)")
        out = self.sessions["vision"].run(None, {"pixel_values": pixels.astype(self.np_dtype),
                                                 "feature_index": image.feature_index()})[0]
        return out.astype(np.float32)
