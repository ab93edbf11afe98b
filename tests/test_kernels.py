"""pmod_mlx.kernels: the Metal kernel sources against their MLX twins, the twins against
the MoD layer's original implementation.

Without Metal, the kernel bodies (the same strings ``mx.fast.metal_kernel`` gets) are
compiled as C++ under ``tests/metal_shim.h``: a generator writes each launch's signature
as MLX generates it (inputs ``const device <type>* name``, outputs ``device <type>* name``,
template arguments as template parameters, ``uint3 thread_position_in_grid``), and a
driver loops over the launch's grid, calling the body once per thread. The driver runs
under AddressSanitizer (each buffer allocated to its exact size, so a read or write out of
bounds fails), and twice: forward over the grid with outputs poisoned one way and in
reverse with them poisoned another; equal results show every output element written and
no thread depending on another's order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pmod_mlx")  # its fast BLAS loads before mlx.core
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from builders import tiny_config  # noqa: E402
from pmod.schedule import kept_count  # noqa: E402
from pmod_mlx import kernels  # noqa: E402
from pmod_mlx.language import DecoderLayer, Routing, rope_tables  # noqa: E402

SHIM = Path(__file__).resolve().parent / "metal_shim.h"
METAL = mx.metal.is_available()
NO_METAL = "Metal is not available (mx.metal.is_available() is False): the real kernels cannot run here"

#: MLX's type names in generated signatures.
MLX_TYPES = {mx.float32: "float", mx.float16: "float16_t", mx.int32: "int32_t", mx.bool_: "bool"}
NP_TYPES = {mx.float32: np.float32, mx.float16: np.float16, mx.int32: np.int32, mx.bool_: np.bool_}


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One MoD routing problem: vision ``mask`` and ``scores`` ``[B, T]``, ``k`` kept."""

    id: str
    mask: np.ndarray
    scores: np.ndarray
    k: int
    weight_norm: tuple = ("tanh", 0.2, 1.0)
    dtype: mx.Dtype = mx.float32
    width: int = 5
    seed: int = 0
    vision_idx: np.ndarray = field(init=False)

    def __post_init__(self):
        self.vision_idx = np.stack([np.flatnonzero(row) for row in self.mask]).astype(np.int32)

    @property
    def n_keep(self) -> int:
        return self.mask.shape[1] - self.vision_idx.shape[1] + self.k

    def route_args(self):
        return (mx.array(self.scores), mx.array(self.mask), mx.array(self.vision_idx), self.k,
                self.weight_norm, self.dtype)


def case(id, B, T, n, k, levels=None, seed=0, **kw) -> Case:
    """Vision tokens at random positions (``n`` per row); ``levels``: scores from that many
    values, so many tie."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), dtype=bool)
    for row in mask:
        row[rng.choice(T, n, replace=False)] = True
    scores = (rng.integers(0, levels, (B, T)) * 0.5 - 1.0 if levels else rng.normal(0, 2, (B, T)))
    return Case(id, mask, scores.astype(np.float32), k, seed=seed, **kw)


CASES = [
    case("ties", 3, 23, 15, 7, levels=3),
    case("all-tied", 2, 11, 8, 3, levels=1),
    case("k0", 2, 9, 5, 0),
    case("k-is-n", 2, 9, 5, 5, levels=2),
    case("n1-kept", 3, 7, 1, 1),
    case("n1-skipped", 3, 7, 1, 0),
    case("all-vision", 2, 13, 13, 6, levels=4),
    case("one-token", 1, 1, 1, 1),
    case("nothing-kept", 2, 4, 4, 0),
    case("sigmoid", 2, 17, 10, 4, weight_norm=("sigmoid", 0.5, 0.7), width=3),
    case("none", 2, 17, 10, 4, levels=5, weight_norm=("none", 0.3, 0.9)),
    case("float16", 2, 19, 12, 5, levels=3, dtype=mx.float16, width=7),
    case("wide", 2, 301, 260, 97, levels=40, width=33, seed=1),
    Case("signed-zero", np.ones((1, 6), bool), np.array([[0.0, -0.0, 0.0, -1.0, -0.0, 1.0]], np.float32), 3),
]
MERGE_CASES = [c for c in CASES if c.n_keep > 0]  # the layer returns gate * x itself when nothing is kept


def merge_inputs(c: Case):
    """``x``, ``h``, ``m``, ``gate``, ``keep``, ``slot`` for the merge of case ``c``."""
    gate, keep, slot = kernels.route(*c.route_args())
    rng = np.random.default_rng(c.seed + 1)
    B, T = c.mask.shape
    x, h, m = (mx.array(rng.normal(0, 1, shape).astype(np.float32)).astype(c.dtype)
               for shape in ((B, T, c.width), (B, c.n_keep, c.width), (B, c.n_keep, c.width)))
    return x, h, m, gate, keep, slot


def merge_launch(c: Case) -> kernels.Launch:
    x, h, m, gate, _, slot = merge_inputs(c)
    return kernels.merge_launch(x, h, m, gate, slot)


def launches() -> list[kernels.Launch]:
    """Every launch the tests make: one compiled function per distinct signature."""
    return [kernels.route_launch(*c.route_args()) for c in CASES] + [merge_launch(c) for c in MERGE_CASES]


# ----------------------------------------------------------------------------- C++ harness
def signature(launch: kernels.Launch) -> tuple:
    """What MLX compiles one kernel for: the kernel, its argument types, its template."""
    return (launch.kernel.name, tuple(a.dtype for a in launch.inputs), tuple(launch.output_dtypes),
            tuple(launch.template))


def cpp_kernel(fname: str, launch: kernels.Launch) -> str:
    """The kernel as MLX would generate it for this launch, in shim C++."""
    k = launch.kernel
    assert all(a.ndim >= 1 for a in launch.inputs), "0-d inputs (constant references) are not emulated"
    params = [f"const device {MLX_TYPES[a.dtype]}* {name}" for name, a in zip(k.inputs, launch.inputs)]
    params += [f"device {MLX_TYPES[d]}* {name}" for name, d in zip(k.outputs, launch.output_dtypes)]
    params.append("uint3 thread_position_in_grid")
    tparams = ", ".join(("typename " if isinstance(v, mx.Dtype) else "int ") + name for name, v in launch.template)
    return f"template <{tparams}>\nvoid {fname}({', '.join(params)}) {{{k.source}}}\n"


def cpp_runner(i: int, launch: kernels.Launch) -> str:
    """``run_<i>(buffers, grid, reverse)``: the kernel once per grid position, in either order."""
    k = launch.kernel
    types = [MLX_TYPES[a.dtype] for a in launch.inputs] + [MLX_TYPES[d] for d in launch.output_dtypes]
    args = [f"reinterpret_cast<{'const ' if j < len(k.inputs) else ''}{t}*>(buf[{j}])" for j, t in enumerate(types)]
    targs = ", ".join(MLX_TYPES[v] if isinstance(v, mx.Dtype) else str(int(v)) for _, v in launch.template)
    return f"""
static void run_{i}(char** buf, uint gx, uint gy, uint gz, bool reverse) {{
    uint64_t total = uint64_t(gx) * gy * gz;
    for (uint64_t q = 0; q < total; ++q) {{
        uint64_t r = reverse ? total - 1 - q : q;
        uint3 pos{{uint(r % gx), uint(r / gx % gy), uint(r / (uint64_t(gx) * gy))}};
        kernel_{i}<{targs}>({", ".join(args)}, pos);
    }}
}}
"""


MAIN = r"""
// usage: driver WHICH GX GY GZ REVERSE DIR NBUF NOUT: buffers DIR/0 .. DIR/NBUF-1 (the last
// NOUT are outputs), each read into an allocation of exactly its size; outputs written back.
int main(int argc, char** argv) {
    if (argc != 9) return 2;
    int which = std::atoi(argv[1]);
    uint gx = uint(std::atol(argv[2])), gy = uint(std::atol(argv[3])), gz = uint(std::atol(argv[4]));
    bool reverse = argv[5][0] == '1';
    std::string dir = argv[6];
    int nbuf = std::atoi(argv[7]), nout = std::atoi(argv[8]);
    std::vector<char*> buf(nbuf);
    std::vector<long> size(nbuf);
    for (int j = 0; j < nbuf; ++j) {
        FILE* f = std::fopen((dir + "/" + std::to_string(j)).c_str(), "rb");
        if (!f) return 3;
        std::fseek(f, 0, SEEK_END);
        size[j] = std::ftell(f);
        std::fseek(f, 0, SEEK_SET);
        buf[j] = static_cast<char*>(std::malloc(size[j] > 0 ? size[j] : 1));
        if (std::fread(buf[j], 1, size[j], f) != size_t(size[j])) return 4;
        std::fclose(f);
    }
    switch (which) {
CASES
        default: return 5;
    }
    for (int j = nbuf - nout; j < nbuf; ++j) {
        FILE* f = std::fopen((dir + "/" + std::to_string(j)).c_str(), "wb");
        if (!f || std::fwrite(buf[j], 1, size[j], f) != size_t(size[j])) return 6;
        std::fclose(f);
    }
    for (char* b : buf) std::free(b);
    return 0;
}
"""


def driver_source(sigs: dict) -> str:
    parts = [f'#include "{SHIM}"\n#include <cstdio>\n#include <cstdlib>\n#include <string>\n#include <vector>\n']
    for i, launch in enumerate(sigs.values()):
        parts += [cpp_kernel(f"kernel_{i}", launch), cpp_runner(i, launch)]
    cases = "\n".join(f"        case {i}: run_{i}(buf.data(), gx, gy, gz, reverse); break;" for i in range(len(sigs)))
    return "".join(parts) + MAIN.replace("CASES", cases)


class Emulator:
    """Runs launches on the compiled driver; ``run(launch)`` -> outputs as numpy arrays."""

    def __init__(self, exe: Path, index: dict, workdir: Path):
        self.exe, self.index, self.workdir = exe, index, workdir

    def _once(self, launch, reverse: bool, poison: int) -> list[bytes]:
        d = self.workdir / f"{'rev' if reverse else 'fwd'}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        n_in = len(launch.inputs)
        for j, a in enumerate(launch.inputs):
            (d / str(j)).write_bytes(np.ascontiguousarray(np.array(a)).tobytes())
        for j, (shape, dt) in enumerate(zip(launch.output_shapes, launch.output_dtypes)):
            nbytes = int(np.prod(shape)) * np.dtype(NP_TYPES[dt]).itemsize
            (d / str(n_in + j)).write_bytes(bytes([poison]) * nbytes)
        cmd = [str(self.exe), str(self.index[signature(launch)]), *map(str, launch.grid), "1" if reverse else "0",
               str(d), str(n_in + len(launch.output_shapes)), str(len(launch.output_shapes))]
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0"}
        proc = subprocess.run(["nice", "-n", "19", *cmd], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, f"the emulated kernel failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        return [(d / str(n_in + j)).read_bytes() for j in range(len(launch.output_shapes))]

    def run(self, launch: kernels.Launch) -> list[np.ndarray]:
        fwd = self._once(launch, reverse=False, poison=0xA5)
        rev = self._once(launch, reverse=True, poison=0x5A)
        assert fwd == rev, "the outputs depend on the thread order or the poison: an element is left unwritten"
        return [np.frombuffer(b, NP_TYPES[dt]).reshape(shape)
                for b, shape, dt in zip(fwd, launch.output_shapes, launch.output_dtypes)]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) to compile the kernel sources with")
    sigs = {}
    for launch in launches():
        sigs.setdefault(signature(launch), launch)
    work = tmp_path_factory.mktemp("kernels")
    src, exe = work / "driver.cpp", work / "driver"
    src.write_text(driver_source(sigs))
    base = [cxx, "-std=c++17", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
            str(src), "-o", str(exe)]
    for flags in (["-fsanitize=address,undefined", "-fno-sanitize-recover=all"], []):  # sanitizers where supported
        proc = subprocess.run(["nice", "-n", "19", *base, *flags], capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, f"the kernel sources do not compile as C++:\n{proc.stderr[-6000:]}"
    return Emulator(exe, {s: i for i, s in enumerate(sigs)}, work)


def test_kernels_need_no_synchronisation():
    """The C++ emulation runs threads one after another: faithful only for kernels whose
    threads share nothing, and with MLX's signature only for what the generator writes."""
    for k in (kernels.ROUTE, kernels.MERGE):
        for word in ("threadgroup", "simd", "barrier", "atomic", "thread_index", "threads_per", "quad_"):
            assert word not in k.source, f"{k.name} uses {word}"
        for name in k.inputs + k.outputs:
            for suffix in ("_shape", "_strides", "_ndim"):
                assert name + suffix not in k.source, f"{k.name} uses {name}{suffix}"


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_route_source_matches_twin(emulator, c):
    gate, flag = emulator.run(kernels.route_launch(*c.route_args()))
    want_gate, want_flag = kernels.route_twin(*c.route_args())
    np.testing.assert_array_equal(flag, np.array(want_flag))
    tol = 1e-6 if c.dtype == mx.float32 else 1e-3
    np.testing.assert_allclose(gate.astype(np.float32), np.array(want_gate.astype(mx.float32)), rtol=0, atol=tol)


@pytest.mark.parametrize("c", MERGE_CASES, ids=lambda c: c.id)
def test_merge_source_matches_twin(emulator, c):
    x, h, m, gate, keep, slot = merge_inputs(c)
    (out,) = emulator.run(kernels.merge_launch(x, h, m, gate, slot))
    want = np.array(kernels.merge_twin(x, h, m, gate, keep).astype(mx.float32))
    tol = 1e-6 if c.dtype == mx.float32 else 4e-3  # float16: GCC may skip the rounding between * and +
    np.testing.assert_allclose(out.astype(np.float32), want, rtol=0, atol=tol)


# ----------------------------------------------------------------------------- twins vs the original layer
def previous_keep(c: Case) -> np.ndarray:
    """The kept positions as the MoD layer chose them before ``pmod_mlx.kernels``."""
    s = mx.array(c.scores)
    vision_idx = mx.array(c.vision_idx)
    text_idx = mx.array(np.stack([np.flatnonzero(~row) for row in c.mask]).astype(np.int32))
    top = mx.argsort(-mx.take_along_axis(s, vision_idx, axis=1), axis=1)[:, :c.k]
    return np.array(mx.sort(mx.concatenate([text_idx, mx.take_along_axis(vision_idx, top, axis=1)], axis=1), axis=1))


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_route_keep_and_slot(c):
    gate, keep, slot = (np.array(a) for a in kernels.route(*c.route_args()))
    np.testing.assert_array_equal(keep, previous_keep(c))
    for b in range(len(keep)):
        want = np.full(c.mask.shape[1], -1)
        want[keep[b]] = np.arange(keep.shape[1])
        np.testing.assert_array_equal(slot[b], want)
    # Exact ties rank by position: with every score equal, the first k vision tokens win.
    if c.id == "all-tied":
        assert all(set(c.vision_idx[b, :c.k]) <= set(keep[b]) for b in range(len(keep)))


def previous_layer(layer: DecoderLayer, x, rope, routing: Routing, text_idx):
    """``DecoderLayer.__call__``'s MoD branch as it was before ``pmod_mlx.kernels`` (no cache)."""
    s = layer.router(x)[..., 0].astype(mx.float32)
    w = layer.w_scale * kernels.WEIGHT_FNS[layer.w_kind][0](s) + layer.w_bias
    k = kept_count(routing.n_vision, layer.ratio)
    gate = mx.where(routing.is_vision, w, 1.0).astype(x.dtype)
    out = gate[..., None] * x
    if k == 0 and text_idx.shape[1] == 0:
        return out
    top = mx.argsort(-mx.take_along_axis(s, routing.vision_idx, axis=1), axis=1)[:, :k]
    keep = mx.sort(mx.concatenate([text_idx, mx.take_along_axis(routing.vision_idx, top, axis=1)], axis=1), axis=1)
    keep = mx.stop_gradient(keep)
    h, m = layer._block(mx.take_along_axis(x, keep[..., None], axis=1), rope.take(keep), None)
    kept = h + mx.take_along_axis(gate, keep, axis=1)[..., None] * m
    return mx.put_along_axis(out, keep[..., None], kept, axis=1)


@pytest.fixture
def twins():
    """The MoD layer on the twins, Metal or not."""
    kernels.set_enabled(False)
    yield
    kernels.set_enabled(True)


def tied_layer(ratio: float, n: int, norm: str):
    """A MoD layer, its inputs and a loss weighting, with exactly tied vision scores (dyadic
    values, exact sums) and two identical tokens."""
    config = tiny_config(mod_weight_norm=norm)
    mx.random.seed(0)
    layer = DecoderLayer(config, ratio)
    rng = np.random.default_rng(3)
    B, T, H = 2, 16, config.hidden_size
    layer.router.weight = mx.array(rng.integers(-2, 3, (1, H)) * 0.25, dtype=mx.float32)
    layer.router.bias = mx.array([0.5], dtype=mx.float32)
    x = mx.array(rng.integers(-2, 3, (B, T, H)) * 0.5, dtype=mx.float32)
    x[:, 5] = x[:, 7]
    mask = np.zeros((B, T), bool)
    for row in mask:
        row[rng.choice(T, n, replace=False)] = True
    scores = np.array(layer.router(x)[..., 0])
    assert any(len(set(row[m])) < m.sum() for row, m in zip(scores, mask)), "no tied vision scores"
    rope = rope_tables(config, mx.arange(T, dtype=mx.int32))
    weights = mx.array(rng.normal(size=(B, T, H)).astype(np.float32))
    return layer, x, mask, rope, weights


def value_and_grads(layer, x, weights, run):
    return nn.value_and_grad(layer, lambda x: (run(x) * weights).sum())(x)


LAYER_CASES = [(0.5, 11, "tanh_0.2_1"), (0.0, 11, "tanh_0.2_1"), (1.0, 11, "sigmoid_0.5_0.7"),
               (0.3, 16, "none_0.3_0.9"), (0.0, 16, "tanh_0.2_1")]


@pytest.mark.parametrize("ratio,n,norm", LAYER_CASES)
def test_layer_with_twins_equals_previous(twins, ratio, n, norm):
    layer, x, mask, rope, weights = tied_layer(ratio, n, norm)
    routing = Routing.from_mask(mask)
    text_idx = mx.array(np.stack([np.flatnonzero(~row) for row in mask]).astype(np.int32))
    got, got_grads = value_and_grads(layer, x, weights, lambda x: layer(x, rope, None, routing))
    want, want_grads = value_and_grads(layer, x, weights, lambda x: previous_layer(layer, x, rope, routing, text_idx))
    np.testing.assert_array_equal(np.array(got), np.array(want))
    for (name, g), (_, w) in zip(tree_flatten(got_grads), tree_flatten(want_grads)):
        np.testing.assert_array_equal(np.array(g), np.array(w), err_msg=name)
    assert np.abs(np.array(got_grads["router"]["weight"])).sum() > 0


@pytest.mark.parametrize("ratio,n,norm", LAYER_CASES)
def test_layer_on_emulated_kernels_equals_twins(ratio, n, norm, emulator, monkeypatch):
    """The kernel path of the layer end to end (launches, compaction, the twins' gradient
    under ``mx.grad``), with the emulation standing in for Metal."""
    layer, x, mask, rope, weights = tied_layer(ratio, n, norm)
    routing = Routing.from_mask(mask)
    run = lambda x: layer(x, rope, None, routing)  # noqa: E731
    kernels.set_enabled(False)
    try:
        want, want_grads = value_and_grads(layer, x, weights, run)
    finally:
        kernels.set_enabled(True)
    monkeypatch.setattr(kernels, "enabled", lambda: True)
    monkeypatch.setattr(kernels.Launch, "run", lambda launch: [mx.array(o) for o in emulator.run(launch)])
    got, got_grads = value_and_grads(layer, x, weights, run)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=1e-5)
    for (name, g), (_, w) in zip(tree_flatten(got_grads), tree_flatten(want_grads)):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-5, atol=1e-5, err_msg=name)


def test_switch():
    try:
        kernels.set_enabled(False)
        assert not kernels.enabled()
        kernels.set_enabled(True)
        assert kernels.enabled() == (METAL and mx.default_device() == mx.gpu)
    finally:
        kernels.set_enabled(True)


# ----------------------------------------------------------------------------- Metal
@pytest.mark.skipif(not METAL, reason=NO_METAL)
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_metal_route_matches_twin(c):
    with mx.stream(mx.gpu):
        gate, flag = kernels.route_launch(*c.route_args()).run()
        want_gate, want_flag = kernels.route_twin(*c.route_args())
    np.testing.assert_array_equal(np.array(flag), np.array(want_flag))
    tol = 1e-6 if c.dtype == mx.float32 else 1e-3
    np.testing.assert_allclose(np.array(gate.astype(mx.float32)), np.array(want_gate.astype(mx.float32)),
                               rtol=0, atol=tol)


@pytest.mark.skipif(not METAL, reason=NO_METAL)
@pytest.mark.parametrize("c", MERGE_CASES, ids=lambda c: c.id)
def test_metal_merge_matches_twin(c):
    with mx.stream(mx.gpu):
        x, h, m, gate, keep, slot = merge_inputs(c)
        (out,) = kernels.merge_launch(x, h, m, gate, slot).run()
        want = kernels.merge_twin(x, h, m, gate, keep)
    tol = 1e-6 if c.dtype == mx.float32 else 4e-3  # float16: Metal may fuse the multiply-add
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(want.astype(mx.float32)), rtol=0, atol=tol)


@pytest.mark.skipif(not METAL, reason=NO_METAL)
def test_metal_layer_kernels_on_and_off():
    """The layer's values and gradients with the kernels equal those with the twins."""
    config = tiny_config()
    mx.random.seed(0)
    layer = DecoderLayer(config, 0.5)
    rng = np.random.default_rng(0)
    B, T, H = 2, 24, config.hidden_size
    x = mx.array(rng.normal(size=(B, T, H)).astype(np.float32))
    mask = np.zeros((B, T), bool)
    mask[:, 3:19] = True
    routing, rope = Routing.from_mask(mask), rope_tables(config, mx.arange(T, dtype=mx.int32))
    weights = mx.array(rng.normal(size=(B, T, H)).astype(np.float32))
    f = nn.value_and_grad(layer, lambda x: (layer(x, rope, None, routing) * weights).sum())
    try:
        with mx.stream(mx.gpu):
            kernels.set_enabled(True)
            got, got_grads = f(x)
            kernels.set_enabled(False)
            want, want_grads = f(x)
    finally:
        kernels.set_enabled(True)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-4)
    for (name, g), (_, w) in zip(tree_flatten(got_grads), tree_flatten(want_grads)):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-5, atol=1e-5, err_msg=name)
