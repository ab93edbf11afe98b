"""pmod_trt: TensorRT engines from the exported graphs, and the TensorRT backend.

No GPU and no TensorRT here (CI never installs them), so this module tests, on a real
export of a tiny LLaVA-NeXT p-MoD (6 layers, MoD layers 2..5, N = 20, context 1024):

* what needs neither: the optimisation profiles computed from the manifest, the precision
  plan, which layers stay float32, the engine manifest (round trip, refusal of engines built
  for another GPU or TensorRT version), the host-side chunk split against pmod_export's;
* the refusals: no tensorrt, no cuda-python, no GPU (one line, exit 2, nothing written),
  ``open_engine(..., backend="trt")`` without TensorRT naming the ``trt`` extra;
* the build and the runtime end to end against *fakes* of ``tensorrt`` and cuda-python's
  runtime module (``FakeTensorRT``, ``FakeCudart`` below): the fake builder records what
  pmod_trt asks of it (profiles, flags, pinned layers, timing cache) and serialises it; the
  fake engine runs each graph with ONNX Runtime on "device" memory that is host memory with
  bounds checks, and enforces the profiles like TensorRT does. This exercises every line of
  pmod_trt's build and runtime except TensorRT's and CUDA's own work: the KV binding
  offsets, profile switching, what is copied between host and device, atomic output.

The GPU tests at the end (real TensorRT: fp32 logits against ONNX Runtime within 1e-3
relative, greedy tokens identical for n = 0, 1, middle, N; fp16 and bf16 greedy tokens) are
skipped with the reason when no GPU with TensorRT is present.
"""

from __future__ import annotations

import bisect
import ctypes
import enum
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch_loader = pytest.importorskip("pmod_export.torch_loader")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
#: Set when another test module imported torch plainly after pmod_mlx (see test_export.py).
MISBOUND = torch_loader.clash()

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from builders import random_tensors, tiny_config  # noqa: E402
from tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

import pmod  # noqa: E402
from pmod.cli import main  # noqa: E402
from pmod.errors import PmodError  # noqa: E402
from pmod.format import save_checkpoint  # noqa: E402
from pmod.schedule import capacities  # noqa: E402
from pmod_trt import build as trt_build  # noqa: E402
from pmod_trt import cuda as trt_cuda  # noqa: E402
from pmod_trt import deps  # noqa: E402
from pmod.chunk import live_lengths, split_chunk  # noqa: E402
from pmod_trt.manifest import check_compatible, read_engine_manifest, read_onnx_export  # noqa: E402
from pmod_trt.profiles import (OPT_HISTORY, OPT_TEXT, Profile, all_profiles, select_profile,  # noqa: E402
                               vision_limits)

N = 20
CONTEXT = 1024
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=14, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
NEXT = dict(vision_config=VISION, mm_projector_type="mlp2x_gelu", mm_hidden_size=24,
            mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], max_position_embeddings=CONTEXT)
GPU = "Fake H100 80GB HBM3"
TRT_VERSION = "10.9.0.34"


# ============================================================================= fakes
class FakeCudart:
    """cuda-python's runtime module, on host memory: every "device" access is bounds-checked."""

    class cudaError_t(enum.Enum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.Enum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class Stream:
        def __int__(self):
            return 0x5EED

    def __init__(self, devices: int = 1, name: str = GPU, cc=(9, 0)):
        self.devices, self.name, self.cc = devices, name, cc
        self.mem: dict[int, np.ndarray] = {}
        self.bases: list[int] = []
        self.copies: list[tuple[str, int]] = []  # (kind, bytes) of every memcpy

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
        a = np.zeros(nbytes, np.uint8)
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
        to_device = kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.view(dst if to_device else src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        self.copies.append(("h2d" if to_device else "d2h", nbytes))
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

    trt.DataType, trt.TensorIOMode, trt.ILogger = DataType, TensorIOMode, ILogger
    trt.float32, trt.float16, trt.bfloat16, trt.int32 = DataType.FLOAT, DataType.HALF, DataType.BF16, DataType.INT32
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 BF16 TF32 PREFER_PRECISION_CONSTRAINTS OBEY_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")

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

        def set_memory_pool_limit(self, pool, nbytes):
            self.pool = nbytes

        def set_flag(self, f):
            self.flags.add(f.name)

        def clear_flag(self, f):
            self.cleared.add(f.name)

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
                      "pinned": pinned, "cache": config.cache.data.decode()}
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

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}
            self.switches = 0

        def set_optimization_profile_async(self, index, stream):
            assert stream == 0x5EED
            self.profile, self.switches = index, self.switches + 1
            return True

        def set_input_shape(self, name, shape):
            declared = self.engine.get_tensor_shape(name)
            ranges = self.engine.record["profiles"][self.profile].get(name)
            if len(shape) != len(declared) or any(d >= 0 and d != s for d, s in zip(declared, shape)):
                return False
            if ranges and any(not lo <= s <= hi for lo, s, hi in zip(ranges[0], shape, ranges[2])):
                return False  # TensorRT: outside the active profile
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            assert ptr, f"null address for {name}"
            self.addresses[name] = ptr
            return True

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
            for d in self.engine.outputs[name].shape:
                terms = [] if isinstance(d, int) else [int(t) if t.isdigit() else sym.get(t, -1) for t in d.split("+")]
                dims.append(d if isinstance(d, int) else -1 if -1 in terms else sum(terms))  # TensorRT: -1 unknown
            return tuple(dims)

        def execute_async_v3(self, stream):
            assert stream == 0x5EED
            rt = trt_cuda.cudart()
            feeds = {}
            for name, i in self.engine.inputs.items():
                dt, shape = np.dtype(_ORT_NP[i.type]), self.shapes[name]
                n = int(np.prod(shape)) * dt.itemsize
                raw = rt.view(self.addresses[name], n) if n else np.zeros(0, np.uint8)
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


@pytest.fixture
def fakes(monkeypatch):
    """Install a fake ``tensorrt`` and cuda runtime; returns a setter to swap either."""

    def install(trt=None, rt=None):
        trt = trt if trt is not None else make_fake_tensorrt()
        rt = rt if rt is not None else FakeCudart()
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(trt_cuda, "_cudart", rt)
        return trt, rt

    install.default = install()
    return install


@pytest.fixture
def no_lint(monkeypatch):
    """Skip the lint subprocess where a test is about something else (it has its own tests)."""
    calls = []
    monkeypatch.setattr(trt_build, "run_lint", lambda d: calls.append(d))
    return calls


# ============================================================================= fixtures
@pytest.fixture(autouse=True)
def _torch_usable(request):
    if MISBOUND and request.node.name != "test_in_a_fresh_process":
        pytest.skip("run by test_in_a_fresh_process: " + MISBOUND)


@pytest.mark.skipif(not MISBOUND, reason="torch is usable in this process")
def test_in_a_fresh_process():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    if MISBOUND:
        pytest.skip("run by test_in_a_fresh_process: " + MISBOUND)
    config = tiny_config(**NEXT)
    tensors = random_tensors(config, seed=0)
    path = save_checkpoint(tmp_path_factory.mktemp("trt") / "ckpt", config, tensors, dtype="float32")
    write_tiny_tokenizer(path, config.vocab_size)
    return config, path, tensors


@pytest.fixture(scope="module")
def exported(ckpt):
    from pmod_export.onnx_export import export_onnx

    return export_onnx(ckpt[1], ckpt[1].parent / "onnx", N)


@pytest.fixture(scope="module")
def reference(exported):
    """The ONNX Runtime engine on the same export: what the TensorRT backend mirrors."""
    return pmod.open_engine(exported, backend="onnx", threads=1)


def build(exported, out, **kw):
    kw.setdefault("progress", False)
    return trt_build.build_engines(exported, out, **kw)


def layout(n: int, where: str, text: int = 10) -> np.ndarray:
    start = {"start": 0, "middle": text // 2, "end": text}[where]
    vm = np.zeros(text + n, dtype=bool)
    vm[start:start + n] = True
    return vm


def chunk_inputs(config, n: int, where: str, seed: int):
    rng = np.random.default_rng(seed)
    vm = layout(n, where)
    return dict(inputs_embeds=rng.standard_normal((vm.size, config.hidden_size)).astype(np.float32), vision_mask=vm)


# ============================================================================= without TensorRT
def test_import_and_help_without_tensorrt(capsys):
    import pmod_trt.build  # noqa: F401
    import pmod_trt.engine  # noqa: F401

    for argv in (["trt", "--help"], ["trt", "build", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "build" in out and "--precision" in out and "--workspace" in out


def test_build_refused_without_tensorrt(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not importable, whatever is installed
    before = sorted(tmp_path.iterdir())
    assert main(["trt", "build", "--onnx", str(exported), "--out", str(tmp_path / "eng")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NVIDIA GPU" in err[0] and "TensorRT" in err[0] and "pmod[trt]" in err[0], err
    assert sorted(tmp_path.iterdir()) == before  # no output, no temporary directory


def test_build_refused_without_gpu(exported, tmp_path, fakes, capsys):
    fakes(rt=FakeCudart(devices=0))
    assert main(["trt", "build", "--onnx", str(exported), "--out", str(tmp_path / "eng")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an NVIDIA GPU, and none is visible (cudaErrorNoDevice)" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_cuda_python_missing(exported, tmp_path, fakes, monkeypatch):
    monkeypatch.setattr(trt_cuda, "_cudart", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    with pytest.raises(PmodError, match=r"needs cuda-python \(not installed\): pip install 'pmod\[trt\]'"):
        build(exported, tmp_path / "eng")
    assert list(tmp_path.iterdir()) == []


def test_open_engine_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(PmodError) as e:
        pmod.open_engine(tmp_path, backend="trt")
    msg = str(e.value)
    assert "\n" not in msg and "pmod[trt]" in msg and "the trt backend needs an NVIDIA GPU with TensorRT" in msg


def test_old_tensorrt_refused(tmp_path, fakes):
    fakes(trt=make_fake_tensorrt(version="8.6.1"))
    with pytest.raises(PmodError, match="needs TensorRT 10 or newer.*found 8.6.1"):
        pmod.open_engine(tmp_path, backend="trt")


# ============================================================================= profiles
def test_profiles_from_the_export(ckpt, exported):
    config = ckpt[0]
    export = read_onnx_export(exported)
    T, caps = CONTEXT, capacities(config, N)
    assert export.max_context == T and export.capacities == caps == [20, 20, 13, 6, 3, 3]
    profiles = all_profiles(export)
    assert {g: [p.name for p in ps] for g, ps in profiles.items()} == {
        "embed": ["tokens"], "vision": ["image"], "prefill": ["prompt"], "decode": ["step", "chunk"]}
    for g, ps in profiles.items():  # exactly the dynamic inputs, each min <= opt <= max
        dynamic = {t.name for t in export.graphs[g].inputs if not all(isinstance(d, int) for d in t.shape)}
        for p in ps:
            assert set(p.shapes) == dynamic, (g, p.name)
            for lo, opt, hi in p.shapes.values():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    H, kv = config.hidden_size, [config.num_key_value_heads, config.head_dim]
    (embed,), (vision,), (prefill,), (step, chunk) = (profiles[g] for g in ("embed", "vision", "prefill", "decode"))
    assert embed.shapes["input_ids"] == ([1, 1], [1, OPT_TEXT], [1, T])
    # prefill: text 0..T-1 (a chunk with n >= 1 vision tokens), every past 0..T-1; vision stream static
    assert prefill.shapes["text_embeds"] == ([1, 0, H], [1, OPT_TEXT, H], [1, T - 1, H])
    assert "vision_embeds" not in prefill.shapes and "n_vision" not in prefill.shapes
    for l in range(6):
        assert prefill.shapes[f"past_key_{l}"] == ([1, 0] + kv, [1, 0] + kv, [1, T - 1] + kv)
        assert prefill.shapes[f"past_positions_{l}"] == ([1, 0], [1, 0], [1, T - 1])
    # decode step: one token; each layer tuned for its own KV length (MoD layers hold fewer)
    assert step.shapes["text_embeds"] == ([1, 1, H],) * 3
    opts = [step.shapes[f"past_key_{l}"][1][1] for l in range(6)]
    assert opts == [OPT_HISTORY + c for c in caps] == [276, 276, 269, 262, 259, 259]
    assert all(step.shapes[f"past_key_{l}"][2][1] == T - 1 for l in range(6))  # a text-only context fills every layer
    assert chunk.shapes["text_positions"] == ([1, 1], [1, OPT_TEXT], [1, T])
    # vision: up to the largest image: base + a 2x2 grid = 5 tiles, 4 + 4 rows of (4 + newline) = 24 tokens
    assert vision.shapes["pixel_values"] == ([1, 3, 28, 28], [5, 3, 28, 28], [5, 3, 28, 28])
    assert vision.shapes["feature_index"] == ([1], [24], [24])


def test_vision_limits_are_the_largest_image(ckpt):
    from PIL import Image

    from pmod.image import preprocess

    config = ckpt[0]
    tiles, tokens = vision_limits(config)
    seen = []
    for size in [(56, 56), (28, 56), (56, 28), (100, 30), (31, 97), (28, 28), (200, 200)]:
        image = preprocess(Image.new("RGB", size, (90, 40, 200)), config)
        seen.append((image.pixel_values.shape[0], image.num_tokens))
    assert max(s[0] for s in seen) == tiles == 5 and max(s[1] for s in seen) == tokens == 24
    flat = tiny_config(vision_config=VISION, mm_projector_type="mlp2x_gelu", mm_hidden_size=24)
    assert vision_limits(flat) == (1, 4)


def test_profile_selection_and_round_trip(exported):
    step, chunk = all_profiles(read_onnx_export(exported))["decode"]
    shapes = lambda t, past: {**{"text_embeds": (1, t, 32), "text_positions": (1, t)},  # noqa: E731
                              **{f"past_{k}_{l}": (1, past, 2, 8) for l in range(6) for k in ("key", "value")},
                              **{f"past_positions_{l}": (1, past) for l in range(6)}}
    assert select_profile([step, chunk], shapes(1, 500)) == 0
    assert select_profile([step, chunk], shapes(7, 0)) == 1
    assert select_profile([step, chunk], shapes(1, CONTEXT)) is None  # past beyond T - 1
    assert select_profile([step, chunk], {**shapes(1, 3), "past_key_2": (1, 4, 2, 8)}) == 0
    for p in (step, chunk):
        assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_unknown_dimension_refused(exported, tmp_path):
    d = tmp_path / "onnx"
    shutil.copytree(exported, d)
    m = json.loads((d / "manifest.json").read_text())
    m["graphs"]["decode"]["inputs"][0]["shape"] = [1, "chunk_len", 32]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PmodError, match="dimension 'chunk_len' that pmod_trt does not know"):
        all_profiles(read_onnx_export(d))


def test_chunk_split_refuses_more_than_n(ckpt):
    with pytest.raises(PmodError, match="at most 20: re-export with --max-vision-tokens 21"):
        split_chunk(np.zeros((21, 32), np.float32), np.ones(21, bool), 0, N)


# ============================================================================= precision
def test_build_plan():
    plan = trt_build.build_plan
    assert plan("fp32", "float32", "10.9.0").strongly_typed
    assert plan("fp16", "float16", "11.0.0").strongly_typed
    bf16 = plan("bf16", "float32", "10.13.0.35")
    assert (bf16.strongly_typed, bf16.flag, bf16.pin_fp32) == (False, "BF16", True)
    with pytest.raises(PmodError, match="the export is float16; fp32 engines need a float32 export: "
                                        "re-export with 'pmod export onnx --dtype float32'"):
        plan("fp32", "float16")
    with pytest.raises(PmodError, match="--dtype float16"):
        plan("fp16", "float32")
    with pytest.raises(PmodError, match="bf16 needs TensorRT 10's weak typing"):
        plan("bf16", "float32", "11.1.0")
    with pytest.raises(PmodError, match="--precision 'int8' is not supported: choose one of fp32, fp16, bf16"):
        plan("int8", "float32")


def test_keep_fp32_on_the_exported_node_names(exported):
    keep = trt_build.keep_fp32
    for g in ("prefill", "decode", "vision"):
        nodes = [n for n in onnx.load(str(exported / f"{g}.onnx"), load_external_data=False).graph.node]
        kept = [n for n in nodes if keep(n.name)]
        for n in nodes:  # norm statistics and routing always; big matmuls never
            if n.op_type in ("ReduceMean", "TopK", "LayerNormalization"):  # RMSNorm variance, routing, CLIP norms
                assert keep(n.name), n.name
            if n.op_type == "MatMul" and any(p in n.name for p in ("proj", "fc1", "fc2", "lm_head", "linear")):
                assert not keep(n.name), n.name
        routers = [n for n in kept if n.op_type == "MatMul" and "router" in n.name]
        assert len(routers) == (4 if g == "prefill" else 0), g
    assert keep("/Tanh_3") and keep("/TopK_2") and keep("/norm/Mul_1") and not keep("/mlp_3/Sigmoid")
    assert not keep("ONNXTRT_ShapeTensorFromDims_12") and not keep("/self_attn_2/Softmax")


# ============================================================================= build (fakes)
def test_build_writes_engines_and_manifest(ckpt, exported, tmp_path, fakes, capsys):
    trt, rt = fakes.default
    cache = tmp_path / "shared.cache"
    cache.write_bytes(b"old:")
    assert main(["trt", "build", "--onnx", str(exported), "--out", str(tmp_path / "eng"), "--workspace", "1.5",
                 "--timing-cache", str(cache)]) == 0
    err = capsys.readouterr().err
    assert "TensorRT" in err and f"wrote {tmp_path / 'eng'}" in err  # the progress bar, then the result
    out = tmp_path / "eng"
    assert sorted(p.name for p in out.iterdir()) == [
        "decode.engine", "embed.engine", "manifest.json", "prefill.engine", "timing.cache", "tokenizer.json",
        "tokenizer_config.json", "vision.engine"]
    m = read_engine_manifest(out)
    assert (m.tensorrt_version, m.gpu, m.precision, m.dtype) == (
        TRT_VERSION, {"name": GPU, "compute_capability": "9.0"}, "fp32", "float32")
    assert m.capacities == [20, 20, 13, 6, 3, 3] and m.max_context == CONTEXT and m.max_vision_tokens == N
    export = read_onnx_export(exported)
    profiles = all_profiles(export)
    assert [r["onnx"].rsplit("/", 1)[-1] for r in trt.built] == ["embed.onnx", "vision.onnx", "decode.onnx",
                                                                 "prefill.onnx"]
    for r in trt.built:  # what the builder was asked: strongly typed fp32, no TF32, the profiles, the pool
        g = Path(r["onnx"]).stem
        assert r["strongly_typed"] and r["flags"] == [] and r["cleared"] == ["TF32"] and r["pinned"] == []
        assert r["pool"] == int(1.5 * (1 << 30))
        assert r["profiles"] == [{k: [list(x) for x in v] for k, v in p.shapes.items()} for p in profiles[g]]
        assert m.engines[g].profiles == profiles[g]
        assert (m.engines[g].inputs, m.engines[g].outputs) == (export.graphs[g].inputs, export.graphs[g].outputs)
    # one timing cache shared by every graph, started from --timing-cache and written back
    assert [r["cache"] for r in trt.built] == ["old:", "old:embed", "old:embedvision", "old:embedvisiondecode"]
    assert (out / "timing.cache").read_bytes() == cache.read_bytes() == b"old:embedvisiondecodeprefill+"
    # manifest round trip
    again = read_engine_manifest(out)
    assert again.to_dict() == m.to_dict() == json.loads((out / "manifest.json").read_text())
    m.write(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text()) == m.to_dict()


def test_bf16_pins_routing_and_norms(ckpt, exported, tmp_path, fakes, no_lint):
    trt, _ = fakes.default
    build(exported, tmp_path / "eng", precision="bf16")
    for r in trt.built:
        assert not r["strongly_typed"] and r["flags"] == ["BF16", "PREFER_PRECISION_CONSTRAINTS"]
        assert all(trt_build.keep_fp32(name) for name in r["pinned"])
    pinned = {Path(r["onnx"]).stem: r["pinned"] for r in trt.built}
    assert sum("router" in p for p in pinned["prefill"]) >= 4 and any("TopK" in p for p in pinned["prefill"])
    assert any("layernorm" in p for p in pinned["decode"]) and any("layer_norm" in p for p in pinned["vision"])
    trt2, _ = fakes(trt=make_fake_tensorrt(version="11.0.0"))
    with pytest.raises(PmodError, match="bf16 needs TensorRT 10's weak typing"):
        build(exported, tmp_path / "eng11", precision="bf16")
    fakes(trt=make_fake_tensorrt(), rt=FakeCudart(name="Tesla T4", cc=(7, 5)))
    with pytest.raises(PmodError, match="bf16 needs compute capability 8.0 or newer; Tesla T4 has 7.5"):
        build(exported, tmp_path / "eng75", precision="bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_failed_build_leaves_nothing(exported, tmp_path, fakes, no_lint):
    fakes(trt=make_fake_tensorrt(fail_graph="prefill"))
    with pytest.raises(PmodError, match=r"could not build the prefill engine \(out of memory building prefill\); "
                                        "nothing was written"):
        build(exported, tmp_path / "eng")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PmodError, match="fp16 engines are built strongly typed from a float16 export"):
        build(exported, tmp_path / "eng", precision="fp16")
    with pytest.raises(PmodError, match="--workspace must be a positive number"):
        build(exported, tmp_path / "eng", workspace_gb=0)
    with pytest.raises(PmodError, match="has no manifest.json, so it is not an ONNX export"):
        build(tmp_path, tmp_path / "eng")
    assert list(tmp_path.iterdir()) == []


def test_lint_runs_first_and_stops_the_build(exported, tmp_path, fakes):
    trt, _ = fakes.default
    bad = tmp_path / "onnx"
    shutil.copytree(exported, bad)
    model = onnx.load(str(bad / "prefill.onnx"))
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    kept = [a for a in topk.attribute if a.name != "sorted"]
    del topk.attribute[:]
    topk.attribute.extend(kept + [onnx.helper.make_attribute("sorted", 0)])
    onnx.save(model, str(bad / "prefill.onnx"))
    with pytest.raises(PmodError, match=r"fails the TensorRT-compatibility lint \(1 finding\(s\), first: "
                                        r"prefill.onnx: .*TopK needs sorted=1.*nothing was built"):
        build(bad, tmp_path / "eng")
    assert trt.built == [] and sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    build(exported, tmp_path / "eng")  # the real lint passes on a clean export
    assert len(trt.built) == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PmodError, match=r"lint of .*empty did not run \(.*holds no .onnx files.*\); it runs before"):
        trt_build.run_lint(empty)


# ============================================================================= runtime (fakes)
@pytest.fixture
def engines_dir(exported, tmp_path, fakes, no_lint):
    return build(exported, tmp_path / "eng")


def test_engines_refused_on_another_gpu_or_tensorrt(engines_dir, fakes):
    fakes(rt=FakeCudart(name="NVIDIA L4", cc=(8, 9)))
    with pytest.raises(PmodError) as e:
        pmod.open_engine(engines_dir, backend="trt")
    msg = str(e.value)
    assert "\n" not in msg and f"built with TensorRT {TRT_VERSION} on {GPU} (compute capability 9.0)" in msg
    assert "this machine has TensorRT 10.9.0.34 on NVIDIA L4 (compute capability 8.9)" in msg
    assert msg.endswith("rebuild it with 'pmod trt build --onnx EXPORT_DIR --out DIR' here")
    fakes(trt=make_fake_tensorrt(version="10.10.0.31"), rt=FakeCudart())
    with pytest.raises(PmodError, match="built with TensorRT 10.9.0.34 .* this machine has TensorRT 10.10.0.31"):
        pmod.open_engine(engines_dir, backend="trt")
    m = read_engine_manifest(engines_dir)
    check_compatible(m, engines_dir, TRT_VERSION, {"name": GPU, "compute_capability": "9.0"})  # the same: fine
    with pytest.raises(PmodError, match="compute capability 9.0.*compute capability 10.0"):
        check_compatible(m, engines_dir, TRT_VERSION, {"name": GPU, "compute_capability": "10.0"})


def test_bad_engine_directories(engines_dir, exported, ckpt, tmp_path, fakes):
    with pytest.raises(PmodError, match="is not a pmod TensorRT manifest.*an ONNX export: use --backend onnx"):
        pmod.open_engine(exported, backend="trt")
    with pytest.raises(PmodError, match="no manifest.json, so it is not a TensorRT engine directory .a pmod checkpoint"):
        pmod.open_engine(ckpt[1], backend="trt")
    with pytest.raises(PmodError, match="is not a pmod ONNX manifest .format 'pmod-trt'. .an engine directory"):
        read_onnx_export(engines_dir)
    d = tmp_path / "copy"
    shutil.copytree(engines_dir, d)
    (d / "decode.engine").write_bytes(b"\x00garbage")
    with pytest.raises(PmodError, match=r"TensorRT cannot load .*decode.engine \(the engine plan file is corrupted\)"):
        pmod.open_engine(d, backend="trt")
    (d / "decode.engine").unlink()
    with pytest.raises(PmodError, match="decode.engine is missing"):
        pmod.open_engine(d, backend="trt")
    shutil.copy2(engines_dir / "decode.engine", d / "decode.engine")
    m = json.loads((d / "manifest.json").read_text())
    m["engines"]["decode"]["inputs"][1]["dtype"] = "int64"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PmodError, match="input 'text_positions' is int32 .* in the engine, int64 .* in the manifest"):
        pmod.open_engine(d, backend="trt")
    with pytest.raises(PmodError, match="holds fp32 engines with float32 inputs and caches; for float16"):
        pmod.open_engine(engines_dir, backend="trt", dtype="float16")


@pytest.mark.parametrize("n,where", [(0, "start"), (1, "end"), (9, "middle"), (N, "start")])
def test_fake_engine_matches_onnx_runtime(ckpt, engines_dir, reference, n, where):
    """The TensorRT backend's host logic on ONNX Runtime-backed fake engines: ORT's answers, bit for bit."""
    config = ckpt[0]
    e = pmod.open_engine(engines_dir, backend="trt")
    reference.reset()
    inputs = chunk_inputs(config, n, where, seed=n + len(where))
    a, b = e.prefill(**inputs), reference.prefill(**inputs)
    assert np.abs(a - b).max() <= 1e-6
    assert e.kv_lengths() == reference.kv_lengths() and e.kv_bytes() == reference.kv_bytes()
    assert all(np.array_equal(p, q) for p, q in zip(e.kept_positions(), reference.kept_positions()))
    tok_a, tok_b = int(np.argmax(a)), int(np.argmax(b))
    for _ in range(3):  # greedy steps over the caches
        assert tok_a == tok_b
        a, b = e.decode(tok_a), reference.decode(tok_b)
        assert np.abs(a - b).max() <= 1e-6
        tok_a, tok_b = int(np.argmax(a)), int(np.argmax(b))
    more = chunk_inputs(config, 3, "middle", seed=99)  # a second chunk with vision tokens
    assert np.abs(e.prefill(**more) - reference.prefill(**more)).max() <= 1e-6
    assert e.kv_lengths() == reference.kv_lengths() and e.position == reference.position


def test_full_context_fits_the_kv_buffers(ckpt, engines_dir, reference):
    """A chunk with one vision token at the end of the context: dense layers write N slots past the live prefix."""
    config = ckpt[0]
    e = pmod.open_engine(engines_dir, backend="trt")
    reference.reset()
    ids = np.random.default_rng(3).integers(3, config.vocab_size, CONTEXT - 11)
    assert np.abs(e.prefill(input_ids=ids) - reference.prefill(input_ids=ids)).max() <= 1e-5
    last = chunk_inputs(config, 1, "end", seed=4)
    assert np.abs(e.prefill(**last) - reference.prefill(**last)).max() <= 1e-5
    assert e.position == CONTEXT and e.kv_lengths() == reference.kv_lengths()
    assert e.cache.capacity == [CONTEXT + c for c in capacities(config, N)]
    with pytest.raises(PmodError, match="prompt too long"):
        e.decode(3)


def test_decode_moves_only_the_chunk_and_the_logits(ckpt, engines_dir, fakes):
    """No host copies of the caches: a decode step copies ids, embeddings and positions in, logits out."""
    config = ckpt[0]
    _, rt = fakes.default
    e = pmod.open_engine(engines_dir, backend="trt")
    e.prefill(**chunk_inputs(config, N, "middle", seed=1))
    decode_ctx = e._contexts["decode"]
    rt.copies.clear()
    e.decode(5)
    H, V = config.hidden_size, config.vocab_size
    h2d = sorted(n for k, n in rt.copies if k == "h2d")
    d2h = sorted(n for k, n in rt.copies if k == "d2h")
    assert h2d == sorted([4, 4 * H, 4]) and d2h == sorted([4 * H, 4 * V])  # ids; embeds + positions | embeds; logits
    e.decode(6)
    assert decode_ctx.switches == 0 and decode_ctx.profile == 0  # decode steps: the step profile
    e.prefill(input_ids=np.arange(3, 9))  # a text chunk: the chunk profile
    assert decode_ctx.profile == 1 and decode_ctx.switches == 1
    e.decode(7)
    assert decode_ctx.profile == 0 and decode_ctx.switches == 2


def test_fake_engine_images_limits_and_dense(ckpt, engines_dir, exported, reference):
    from PIL import Image

    from pmod.image import preprocess

    config = ckpt[0]
    e = pmod.open_engine(engines_dir, backend="trt")
    image = preprocess(Image.new("RGB", (50, 40), (200, 30, 60)), config)
    assert np.abs(e.encode_image(image) - reference.encode_image(image)).max() <= 1e-6
    ids = np.array([3, 4, 5, 6])
    assert np.abs(e.embed(ids) - reference.embed(ids)).max() <= 1e-6 and e.embed([]).shape == (0, config.hidden_size)
    with pytest.raises(PmodError, match="token ids must be in"):
        e.embed([config.vocab_size])
    with pytest.raises(PmodError, match="at most 20: re-export with --max-vision-tokens 21 or more and rebuild"):
        e.prefill(**chunk_inputs(config, 21, "start", seed=0))
    assert e.position == 0 and e.kv_lengths() == [0] * 6
    with pytest.raises(PmodError, match="prompt too long: 1025 tokens exceed the exported context of 1024"):
        e.prefill(input_ids=np.zeros(CONTEXT + 1, np.int32))
    reference.reset()  # an all-vision chunk (text_len 0) on an empty cache, then a text chunk
    all_vision = dict(inputs_embeds=np.random.default_rng(6).standard_normal((N, config.hidden_size)),
                      vision_mask=np.ones(N, bool))
    assert np.abs(e.prefill(**all_vision) - reference.prefill(**all_vision)).max() <= 1e-6
    assert np.abs(e.prefill(input_ids=ids) - reference.prefill(input_ids=ids)).max() <= 1e-6
    assert e.kv_lengths() == reference.kv_lengths()
    dense = pmod.open_engine(engines_dir, backend="trt", dense=True)
    ref_dense = pmod.open_engine(exported, backend="onnx", dense=True, threads=1)
    inputs = chunk_inputs(config, 9, "middle", seed=5)
    assert np.abs(dense.prefill(**inputs) - ref_dense.prefill(**inputs)).max() <= 1e-6
    assert dense.kv_lengths() == [19] * 6
    e.close()


def test_generate_through_the_trt_backend(engines_dir, exported, capsys):
    """`pmod generate --backend trt` on the engine directory (tokenizer copied by the build)."""
    args = ["generate", "--prompt", "what colour is the circle ?", "--max-tokens", "4"]
    assert main(args + ["--model", str(engines_dir), "--backend", "trt"]) == 0
    got = capsys.readouterr().out
    assert main(args + ["--model", str(exported), "--backend", "onnx"]) == 0
    assert got == capsys.readouterr().out


# ============================================================================= on a GPU
GPU_CASES = [(0, "start"), (1, "end"), (9, "middle"), (N, "start")]
GREEDY_STEPS = 4


def test_gpu_cases_have_clear_margins(ckpt):
    """The GPU comparisons are discrete (kept sets, greedy tokens): on the float64 reference, the
    cases they use have no router near-tie at a top-k boundary and a clear top-1 at every step."""
    from reference import Reference

    config, _, tensors = ckpt
    for n, where in GPU_CASES:
        ref = Reference(config, tensors)
        inputs = chunk_inputs(config, n, where, seed=n + len(where))
        logits = ref.prefill(embeds=inputs["inputs_embeds"], vision_mask=inputs["vision_mask"])[-1]
        vidx = np.nonzero(inputs["vision_mask"])[0]
        for l, kept in enumerate(ref.kept):
            if kept is not None and 0 < len(kept) < len(vidx):
                s = np.sort(ref.scores[l][vidx])[::-1]
                assert s[len(kept) - 1] - s[len(kept)] > 1e-4, f"n={n} {where}: layer {l} router near-tie"
        for _ in range(GREEDY_STEPS):
            assert _margin(logits) > 1e-3, f"n={n} {where}: greedy near-tie; choose another seed"
            logits = ref.decode(int(np.argmax(logits)))


def _gpu_missing() -> str | None:
    """Why the GPU tests cannot run here (None: TensorRT and a GPU are present)."""
    saved = trt_cuda._cudart
    try:
        deps.tensorrt("this GPU test")
        trt_cuda._cudart = None
        trt_cuda.gpu_info("this GPU test")
        return None
    except PmodError as e:
        return str(e)
    finally:
        trt_cuda._cudart = saved


GPU_MISSING = _gpu_missing()
on_gpu = pytest.mark.skipif(GPU_MISSING is not None, reason=str(GPU_MISSING))


@pytest.fixture(scope="module")
def exported16(ckpt):
    from pmod_export.onnx_export import export_onnx

    return export_onnx(ckpt[1], ckpt[1].parent / "onnx16", N, dtype="float16")


def _margin(logits: np.ndarray) -> float:
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


@on_gpu
@pytest.mark.parametrize("n,where", GPU_CASES)
def test_gpu_fp32_matches_onnx_runtime(ckpt, exported, reference, tmp_path_factory, n, where):
    config = ckpt[0]
    out = tmp_path_factory.getbasetemp() / "gpu-fp32"
    if not out.exists():
        build(exported, out, precision="fp32")
    e = pmod.open_engine(out, backend="trt")
    reference.reset()
    inputs = chunk_inputs(config, n, where, seed=n + len(where))
    a, b = e.prefill(**inputs), reference.prefill(**inputs)
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
    assert e.kv_lengths() == reference.kv_lengths()
    assert all(np.array_equal(p, q) for p, q in zip(e.kept_positions(), reference.kept_positions()))
    for _ in range(GREEDY_STEPS):
        assert int(np.argmax(a)) == int(np.argmax(b))
        tok = int(np.argmax(b))
        a, b = e.decode(tok), reference.decode(tok)
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()


@on_gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_reduced_precision_greedy_tokens(ckpt, exported, exported16, reference, tmp_path, precision):
    """Reduced precision keeps the greedy tokens (teacher-forced on ORT float32's, where its margin is clear)."""
    config = ckpt[0]
    # top-1 margin (of ORT float32's logits) that rounding cannot flip, and how many such steps the
    # cases give (of 16; measured on ONNX Runtime: 13 above 0.1, 7 above 0.3; float16 logits err < 0.05)
    clear, enough = {"fp16": (0.1, 10), "bf16": (0.3, 6)}[precision]
    try:
        build(exported16 if precision == "fp16" else exported, tmp_path / precision, precision=precision)
    except PmodError as e:
        if str(e).startswith("bf16 needs"):  # TensorRT 11, or compute capability < 8.0
            pytest.skip(str(e))
        raise
    e = pmod.open_engine(tmp_path / precision, backend="trt")
    compared = 0
    for n, where in GPU_CASES:
        e.reset()
        reference.reset()
        inputs = chunk_inputs(config, n, where, seed=n + len(where))
        a, b = e.prefill(**inputs), reference.prefill(**inputs)
        for _ in range(GREEDY_STEPS):
            if _margin(b) > clear:
                assert int(np.argmax(a)) == int(np.argmax(b)), (n, where)
                compared += 1
            tok = int(np.argmax(b))
            a, b = e.decode(tok), reference.decode(tok)
    assert compared >= enough, f"only {compared} clear greedy steps to compare; choose another seed"


@on_gpu
def test_gpu_engine_refused_elsewhere(exported, tmp_path):
    out = build(exported, tmp_path / "eng", precision="fp32")
    m = json.loads((out / "manifest.json").read_text())
    m["gpu"]["name"] = "Another GPU"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PmodError, match="engines run only where they were built"):
        pmod.open_engine(out, backend="trt")
