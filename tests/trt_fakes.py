"""Fakes of ``tensorrt`` and of cuda-python's runtime module, for the TensorRT tests (``test_trt.py``).

``FakeCudart`` keeps "device" memory on the host and bounds-checks every access to it;
``make_fake_tensorrt`` builds a ``tensorrt`` module whose builder records what pmod_trt asks
of it and whose engines run each graph with ONNX Runtime on that memory, holding pmod_trt to
TensorRT's rules (the active profile's ranges, aligned addresses, enough context memory).
The fake engines read and write device memory through ``pmod_trt.cuda.cudart()``: install
both (``test_trt.fakes``).
"""

from __future__ import annotations

import bisect
import ctypes
import enum
import json
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pmod_trt import cuda as trt_cuda

GPU = "Fake H100 80GB HBM3"
TRT_VERSION = "10.9.0.34"
#: TensorRT requires every tensor address (and the context memory) to be 256-byte aligned.
TRT_ALIGN = 256


class FakeCudart:
    """cuda-python's runtime module, on host memory: every "device" access is bounds-checked.

    ``cudaMalloc`` returns 256-byte aligned addresses, as CUDA does; ``copies`` records
    ``(kind, bytes, destination)`` of every memcpy (kind ``h2d``, ``d2h`` or ``d2d``).
    """

    class cudaError_t(enum.Enum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.Enum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class Stream:
        def __int__(self):
            return 0x5EED

    def __init__(self, devices: int = 1, name: str = GPU, cc=(9, 0)):
        self.devices, self.name, self.cc = devices, name, cc
        self.mem: dict[int, np.ndarray] = {}
        self.bases: list[int] = []
        self.copies: list[tuple[str, int, int]] = []

    ok = property(lambda self: self.cudaError_t.cudaSuccess)

    def cudaGetDeviceCount(self):
        return (self.ok, self.devices) if self.devices else (self.cudaError_t.cudaErrorNoDevice, 0)

    def cudaGetDevice(self):
        return self.ok, 0

    def cudaGetDeviceProperties(self, device):
        return self.ok, types.SimpleNamespace(name=self.name.encode() + b"\0" * 8, major=self.cc[0], minor=self.cc[1])

    def cudaStreamCreate(self):
        return self.ok, self.Stream()

    def cudaStreamSynchronize(self, stream):
        return (self.ok,)

    def cudaStreamDestroy(self, stream):
        return (self.ok,)

    def cudaMalloc(self, nbytes):
        raw = np.zeros(nbytes + TRT_ALIGN, np.uint8)
        skip = -raw.ctypes.data % TRT_ALIGN
        a = raw[skip:skip + nbytes]  # exactly nbytes, so an access past them fails the bounds check
        ptr = a.ctypes.data
        self.mem[ptr] = a
        bisect.insort(self.bases, ptr)
        return self.ok, ptr

    def cudaFree(self, ptr):
        self.mem.pop(ptr)
        self.bases.remove(ptr)
        return (self.ok,)

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        """The ``nbytes`` at device address ``ptr`` (inside one allocation, else AssertionError)."""
        i = bisect.bisect_right(self.bases, ptr) - 1
        assert i >= 0, f"address {ptr:#x} is not device memory"
        base = self.bases[i]
        a = self.mem[base]
        assert ptr + nbytes <= base + a.nbytes, f"device access past the end of a {a.nbytes}-byte buffer"
        return a[ptr - base:ptr - base + nbytes]

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        K = self.cudaMemcpyKind
        if kind in (K.cudaMemcpyHostToDevice, K.cudaMemcpyDeviceToDevice):
            self.view(dst, nbytes)
        if kind in (K.cudaMemcpyDeviceToHost, K.cudaMemcpyDeviceToDevice):
            self.view(src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        name = {K.cudaMemcpyHostToDevice: "h2d", K.cudaMemcpyDeviceToHost: "d2h", K.cudaMemcpyDeviceToDevice: "d2d"}
        self.copies.append((name[kind], nbytes, dst))
        return (self.ok,)


_ORT_NP = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
           "tensor(int64)": "int64", "tensor(bool)": "bool"}
_ONNX_NP = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 9: "bool", 16: "bfloat16"}


def make_fake_tensorrt(version: str = TRT_VERSION, fail_graph: str | None = None):
    """A ``tensorrt`` module: the builder records its requests, engines run on ONNX Runtime."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.built = []  # the serialized "engines" (dicts), in build order

    class DataType(enum.Enum):
        FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64 = range(9)

    np_of = {DataType.FLOAT: "float32", DataType.HALF: "float16", DataType.INT32: "int32",
             DataType.INT64: "int64", DataType.BOOL: "bool", DataType.BF16: "bfloat16"}
    of_np = {v: k for k, v in np_of.items()}

    class TensorIOMode(enum.Enum):
        NONE, INPUT, OUTPUT = range(3)

    class ILogger:
        class Severity(enum.IntEnum):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    Strategy = enum.Enum("ExecutionContextAllocationStrategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")
    trt.DataType, trt.TensorIOMode, trt.ILogger = DataType, TensorIOMode, ILogger
    trt.ExecutionContextAllocationStrategy = Strategy
    trt.float32, trt.float16, trt.bfloat16, trt.int32 = DataType.FLOAT, DataType.HALF, DataType.BF16, DataType.INT32
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 BF16 TF32 PREFER_PRECISION_CONSTRAINTS OBEY_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    trt.PreviewFeature = enum.Enum("PreviewFeature", "PROFILE_SHARING_0806 ALIASED_PLUGIN_IO_10_03 "
                                                     "RUNTIME_ACTIVATION_RESIZE_10_10")

    class Tensor:
        def __init__(self, name, dtype, shape=()):
            self.name, self.dtype, self.shape = name, dtype, tuple(shape)

    class Layer:
        def __init__(self, name, outputs):
            self.name, self.outputs, self.precision, self.output_types = name, outputs, None, {}

        num_outputs = property(lambda self: len(self.outputs))

        def get_output(self, j):
            return self.outputs[j]

        def set_output_type(self, j, dt):
            self.output_types[j] = dt

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.layers, self.path = flags, [], [], None

        num_inputs = property(lambda self: len(self.inputs))
        num_layers = property(lambda self: len(self.layers))

        def get_input(self, i):
            return self.inputs[i]

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        """One layer per ONNX node but Constant, named exactly after the node (as TensorRT's parser does)."""

        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
            g, net = model.graph, self.network
            net.path = path
            types_ = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.output)}
            for vi in g.input:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
                net.inputs.append(Tensor(vi.name, of_np[_ONNX_NP[vi.type.tensor_type.elem_type]], dims))
            for node in g.node:
                if node.op_type != "Constant":
                    outs = [Tensor(o, of_np.get(_ONNX_NP.get(types_.get(o, 1), "float32"), DataType.FLOAT))
                            for o in node.output]
                    net.layers.append(Layer(node.name, outs))
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.flags, self.cleared, self.profiles, self.pool, self.cache = set(), set(), [], None, None
            self.preview = set()

        def set_memory_pool_limit(self, pool, nbytes):
            self.pool = nbytes

        def set_flag(self, f):
            self.flags.add(f.name)

        def clear_flag(self, f):
            self.cleared.add(f.name)

        def set_preview_feature(self, feature, enable):
            (self.preview.add if enable else self.preview.discard)(feature.name)

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def add_optimization_profile(self, p):
            if any(not (a <= b <= c) for lo, opt, hi in p.shapes.values() for a, b, c in zip(lo, opt, hi)):
                return -1
            self.profiles.append(p.shapes)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            graph = Path(network.path).stem
            if graph == fail_graph:
                self.logger.log(ILogger.Severity.ERROR, f"out of memory building {graph}")
                return None
            strongly = bool(network.flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            pinned = [l.name for l in network.layers if l.precision == DataType.FLOAT]
            record = {"onnx": network.path, "profiles": config.profiles, "strongly_typed": strongly,
                      "flags": sorted(config.flags), "cleared": sorted(config.cleared), "pool": config.pool,
                      "preview": sorted(config.preview), "pinned": pinned, "cache": config.cache.data.decode()}
            trt.built.append(record)
            config.cache.data += graph.encode()
            return json.dumps(record).encode()

    class Engine:
        def __init__(self, record):
            self.record = record
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            self.session = ort.InferenceSession(record["onnx"], opts, providers=["CPUExecutionProvider"])
            self.inputs = {i.name: i for i in self.session.get_inputs()}
            self.outputs = {o.name: o for o in self.session.get_outputs()}
            self.names = list(self.inputs) + list(self.outputs)
            config = json.loads((Path(record["onnx"]).parent / "manifest.json").read_text())["config"]
            self.heads = config["num_attention_heads"]

        num_io_tensors = property(lambda self: len(self.names))
        num_optimization_profiles = property(lambda self: len(self.record["profiles"]))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return of_np[_ORT_NP[(self.inputs.get(name) or self.outputs[name]).type]]

        def get_tensor_shape(self, name):
            return [d if isinstance(d, int) else -1 for d in (self.inputs.get(name) or self.outputs[name]).shape]

        def is_shape_inference_io(self, name):
            return False

        def activation_bytes(self, shapes: dict) -> int:
            """A model of the context memory a run at ``shapes`` (input name -> shape) needs.

            Decoder graphs: float32 attention scores of the chunk's ``S`` = text + vision tokens
            against the past and themselves, per head, for the layer with the longest past;
            embed and vision: the size of their inputs.
            """
            if "text_embeds" not in self.inputs:
                return sum(4 * int(np.prod(shapes[n])) for n in self.inputs)
            S = shapes["text_embeds"][1] + (shapes["vision_embeds"][1] if "vision_embeds" in self.inputs else 0)
            pasts = [shapes[n][1] for n in self.inputs if n.startswith("past_key_")]
            return max(self.heads * S * (P + S) * 4 for P in pasts)

        def profile_bytes(self, index: int) -> int:
            """The model at profile ``index``'s maximum shapes (what a statically allocated context holds)."""
            ranges = self.record["profiles"][index]
            return self.activation_bytes({n: ranges[n][2] if n in ranges else self.get_tensor_shape(n)
                                          for n in self.inputs})

        def create_execution_context(self, strategy=Strategy.STATIC):
            return Context(self, strategy)

    class Context:
        """Holds pmod_trt to TensorRT's rules: the active profile's ranges, aligned addresses, and
        (``USER_MANAGED``) context memory of at least the current shapes' need, set after the
        last shape change. ``memory``: the bytes the context holds (``STATIC``: the most any
        profile needs, ``ON_PROFILE_CHANGE``: the active profile's, ``USER_MANAGED``: what it was given)."""

        def __init__(self, engine, strategy):
            self.engine, self.strategy, self.profile, self.shapes, self.addresses = engine, strategy, 0, {}, {}
            self.switches = 0
            self.user_managed = strategy == Strategy.USER_MANAGED
            self.memory = None if self.user_managed else self._profile_memory()
            self.memory_set = False  # USER_MANAGED: since the last shape change

        def _profile_memory(self):
            if self.strategy == Strategy.STATIC:
                return max(self.engine.profile_bytes(i) for i in range(self.engine.num_optimization_profiles))
            return self.engine.profile_bytes(self.profile)

        def set_optimization_profile_async(self, index, stream):
            assert stream == 0x5EED
            self.profile, self.switches, self.memory_set = index, self.switches + 1, False
            if self.strategy == Strategy.ON_PROFILE_CHANGE:
                self.memory = self._profile_memory()
            return True

        def set_input_shape(self, name, shape):
            declared = self.engine.get_tensor_shape(name)
            ranges = self.engine.record["profiles"][self.profile].get(name)
            if len(shape) != len(declared) or any(d >= 0 and d != s for d, s in zip(declared, shape)):
                return False
            if ranges and any(not lo <= s <= hi for lo, s, hi in zip(ranges[0], shape, ranges[2])):
                return False  # TensorRT: outside the active profile
            if self.shapes.get(name) != tuple(shape):
                self.memory_set = False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            assert ptr, f"null address for {name}"
            assert ptr % TRT_ALIGN == 0, f"address {ptr:#x} of {name} is not {TRT_ALIGN}-byte aligned"
            self.addresses[name] = ptr
            return True

        def update_device_memory_size_for_shapes(self):
            missing = [n for n in self.engine.inputs if n not in self.shapes]
            assert not missing, f"input shapes not set: {missing}"
            return self.engine.activation_bytes(self.shapes)

        def set_device_memory(self, ptr, size):
            assert self.user_managed, "set_device_memory needs a USER_MANAGED context"
            assert ptr % TRT_ALIGN == 0, f"context memory at {ptr:#x} is not {TRT_ALIGN}-byte aligned"
            trt_cuda.cudart().view(ptr, size)
            self.memory, self.memory_set = size, True

        def _symbols(self):
            sym = {}
            for name, i in self.engine.inputs.items():
                for d, v in zip(i.shape, self.shapes.get(name, [-1] * len(i.shape))):
                    if not isinstance(d, int):
                        sym[d] = v
            return sym

        def get_tensor_shape(self, name):
            if name in self.engine.inputs:
                return self.shapes[name]
            sym = self._symbols()
            dims = []
            for d in self.engine.outputs[name].shape:  # e.g. 4, "text_len", "text_len+keep_3_0", "text_len+5"
                terms = [] if isinstance(d, int) else [int(t) if t.isdigit() else sym.get(t, -1) for t in d.split("+")]
                dims.append(d if isinstance(d, int) else -1 if -1 in terms else sum(terms))  # TensorRT: -1 unknown
            return tuple(dims)

        def execute_async_v3(self, stream):
            assert stream == 0x5EED
            if self.user_managed:
                need = self.engine.activation_bytes(self.shapes)
                assert self.memory_set and self.memory >= need, (
                    f"context memory {self.memory} (set since the last shape change: {self.memory_set}) "
                    f"for a run that needs {need}")
            rt = trt_cuda.cudart()
            feeds = {}
            for name, i in self.engine.inputs.items():
                dt, shape = np.dtype(_ORT_NP[i.type]), self.shapes[name]
                n = int(np.prod(shape)) * dt.itemsize
                raw = rt.view(self.addresses[name], n) if n else np.zeros(0, np.uint8)  # empty carriers, no past
                feeds[name] = raw.view(dt).reshape(shape).copy()  # TensorRT reads before it writes
            for name, value in zip(self.engine.outputs, self.engine.session.run(None, feeds)):
                assert value.shape == self.get_tensor_shape(name), (name, value.shape, self.get_tensor_shape(name))
                if value.nbytes:
                    rt.view(self.addresses[name], value.nbytes)[:] = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
            return True

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(bytes(data)))
            except (ValueError, UnicodeDecodeError):
                self.logger.log(ILogger.Severity.ERROR, "the engine plan file is corrupted")
                return None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt
