"""``pmod.open_engine(dir, backend="onnx")``: the exported graphs run by ONNX Runtime.

``dir`` is a directory written by ``pmod export onnx`` (``--target ort``, the default); its
manifest is checked against the files and against each graph's inputs and outputs before
anything runs. What the static engines share (chunk plan, context, KV bookkeeping) is
:class:`pmod.static.engine.StaticEngine`; this module only runs graphs.

KV cache without round trips: each run binds, through ``IOBinding`` raw pointers, every
layer's live prefix as ``past_*`` and the place for its new entries as ``new_*``, so the
graph reads the cache in place and writes the new entries in place. On the CPU the buffers
are numpy arrays (:class:`pmod.static.cache.HostKV`, written straight after the prefix); on
CUDA they are ``OrtValue`` buffers (:class:`OrtDeviceKV`) and every bound address is 256-byte
aligned: where a layer's free space is not, the graph writes into aligned scratch and one
run of a small Identity graph copies the live entries after the prefix, on the device. The
only per-step transfers are what the engine API forces: the chunk's embeddings and
positions in, the logits ``[V]`` out.
"""

from __future__ import annotations

import numpy as np

from pmod.errors import PmodError, first_line
from pmod.static.cache import ALIGN, DeviceKV, HostKV
from pmod.static.chunk import Step
from pmod.static.engine import StaticEngine
from pmod.static.manifest import MANIFEST, check_io, read_manifest

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(double)": "float64",
              "tensor(bfloat16)": "bfloat16", "tensor(uint8)": "uint8"}


class _Buffer:
    """``nbytes`` of an ``OrtValue`` on ``device``, its address rounded up to ``ALIGN``."""

    def __init__(self, nbytes: int, device: str):
        import onnxruntime as ort

        self.nbytes = int(nbytes)
        self.value = ort.OrtValue.ortvalue_from_shape_and_type([self.nbytes + ALIGN], np.uint8, device, 0)
        base = self.value.data_ptr()
        self.ptr = base + (-base) % ALIGN


class OrtDeviceKV(DeviceKV):
    """:class:`~pmod.static.cache.DeviceKV` in ``OrtValue`` memory; copies run an Identity graph there."""

    def __init__(self, num_layers, n_kv, head_dim, dtype, capacities: list[int], device: str, providers):
        self.device, self.providers, self._sessions = device, list(providers), {}
        super().__init__(num_layers, n_kv, head_dim, dtype, capacities)

    def _alloc(self, nbytes: int) -> _Buffer:
        return _Buffer(nbytes, self.device)

    def _copy(self, copies) -> None:
        sess = self._session(len(copies))
        b = sess.io_binding()
        for i, (dst, src, nbytes) in enumerate(copies):
            b.bind_input(f"src{i}", self.device, 0, np.uint8, [nbytes], src)
            b.bind_output(f"dst{i}", self.device, 0, np.uint8, [nbytes], dst)
        sess.run_with_iobinding(b)

    def _session(self, count: int):
        """An Identity graph of ``count`` byte vectors (one per copy), built once per count."""
        if count not in self._sessions:
            import onnxruntime as ort
            from onnx import TensorProto, helper

            ins = [helper.make_tensor_value_info(f"src{i}", TensorProto.UINT8, [f"n{i}"]) for i in range(count)]
            outs = [helper.make_tensor_value_info(f"dst{i}", TensorProto.UINT8, [f"n{i}"]) for i in range(count)]
            nodes = [helper.make_node("Identity", [f"src{i}"], [f"dst{i}"]) for i in range(count)]
            model = helper.make_model(helper.make_graph(nodes, "commit", ins, outs),
                                      opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._sessions[count] = ort.InferenceSession(model.SerializeToString(), opts, providers=self.providers)
        return self._sessions[count]

    def _read(self, buf: _Buffer, out: np.ndarray) -> None:
        start = buf.ptr - buf.value.data_ptr()
        out[...] = buf.value.numpy()[start:start + out.nbytes].view(out.dtype).reshape(out.shape)


class OrtEngine(StaticEngine):
    #: export targets this engine opens (``trt`` graphs are TensorRT's; ONNX Runtime could run
    #: them, slower, but an export is made for one runtime)
    targets = ("ort",)

    def __init__(self, path, dtype: str | None = None, dense: bool = False, providers=None,
                 device_kv: bool | None = None, threads: int | None = None, retention: float | None = None):
        import onnxruntime as ort

        m = read_manifest(path)
        if m.target not in self.targets:
            raise PmodError(f"{path} was exported for TensorRT (--target {m.target}); for ONNX Runtime export it with "
                            "'pmod export onnx --target ort' (the default)")
        self._open(path, m, dtype, retention, dense)
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
                raise PmodError(f"onnxruntime cannot load {file} ({first_line(e)}); {m.fix}") from None
            check_io(self.path / MANIFEST, spec,
                     [(i.name, _ORT_TYPES.get(i.type, i.type), i.shape) for i in sess.get_inputs()],
                     [(o.name, _ORT_TYPES.get(o.type, o.type), o.shape) for o in sess.get_outputs()], m.fix)
            self.sessions[name] = sess
        decode = self.sessions["decode"]
        self.device = "cuda" if decode.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        c = self.config
        L, n_kv, D = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
        if device_kv if device_kv is not None else self.device != "cpu":
            self.cache = OrtDeviceKV(L, n_kv, D, self.np_dtype, self.kv_capacity(), self.device,
                                     decode.get_providers())
        else:
            self.cache = HostKV(L, n_kv, D, self.np_dtype)
        self._logits = np.empty((1, c.vocab_size), np.float32)

    def _run_decoder(self, step: Step) -> np.ndarray:
        sess = self.sessions[step.graph]
        b = sess.io_binding()
        feeds = {name: np.ascontiguousarray(a) for name, a in step.feeds.items()}  # alive until the run ends
        for name, a in feeds.items():
            b.bind_cpu_input(name, a)
        dev = self.cache.device if isinstance(self.cache, OrtDeviceKV) else "cpu"
        for name, shape, dt, addr, output in self.cache.bindings(step.slots):
            (b.bind_output if output else b.bind_input)(name, dev, 0, dt.type, shape, addr)
        b.bind_output("logits", "cpu", 0, np.float32, list(self._logits.shape), self._logits.ctypes.data)
        try:
            sess.run_with_iobinding(b)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
            raise PmodError(f"onnxruntime failed on the {step.graph} graph ({first_line(e)}); "
                            f"{self.manifest.fix}") from None
        return self._logits[0].copy()

    def _run_embed(self, ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed"].run(None, {"input_ids": ids})[0]

    def matmul_probe(self, n: int):
        """A one-node MatMul graph on this engine's providers and device, inputs bound there."""
        import onnxruntime as ort
        from onnx import TensorProto, helper

        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ABC"]
        graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul", spec[:2], spec[2:])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = min(model.ir_version, 8)  # what every ONNX Runtime pmod supports reads
        sess = ort.InferenceSession(model.SerializeToString(), providers=self.sessions["decode"].get_providers())
        binding = sess.io_binding()
        for name, arr in (("A", a), ("B", b)):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0))
        binding.bind_output("C", self.device)
        return lambda: sess.run_with_iobinding(binding)

    def _run_vision(self, pixels: np.ndarray, index: np.ndarray) -> np.ndarray:
        return self.sessions["vision"].run(None, {"pixel_values": pixels, "feature_index": index})[0]
