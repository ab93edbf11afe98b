"""pmod_trt: TensorRT engines from the exported graphs, and the TensorRT backend.

No GPU and no TensorRT here (CI never installs them), so this module tests, on real
``--target trt`` exports of a tiny LLaVA-NeXT p-MoD (6 layers, MoD layers 2..5, N = 20,
context 1024; one shape-following prefill graph, and one with buckets 5, 12, 20):

* what needs neither: the optimisation profiles computed from the manifest, the precision
  plan, which nodes stay float32 (norms by name, the router-to-TopK data flow), the engine
  manifest (round trip, refusal of engines built for another GPU or TensorRT version), the
  supported TensorRT range;
* the refusals: no tensorrt, no cuda-python, no GPU, a TensorRT outside 10.1..11, an export
  for ONNX Runtime (one line, exit 2, nothing written), ``open_engine(..., backend="trt")``
  without TensorRT naming the ``trt`` extra;
* the build and the runtime end to end against *fakes* of ``tensorrt`` and cuda-python's
  runtime module (``make_fake_tensorrt``, ``FakeCudart`` in ``trt_fakes``): the fake builder records
  what pmod_trt asks of it (profiles, flags, preview features, pinned layers, timing cache)
  and serialises it; the fake engine runs each graph with ONNX Runtime on "device" memory
  that is host memory with bounds checks, and holds pmod_trt to what TensorRT requires:
  the active profile's ranges, 256-byte aligned tensor addresses, and (user-managed
  contexts) enough context memory for the current shapes. This exercises every line of
  pmod_trt's build and runtime except TensorRT's and CUDA's own work: the KV binding
  offsets and their aligned scratch, context memory, profile switching, what is copied
  between host and device, atomic output.

The reference is ONNX Runtime on the same ``--target trt`` graphs (``TrtGraphsOnOrt``): the
fake engines must give its answers bit for bit. The GPU tests at the end (real TensorRT:
fp32 logits against ONNX Runtime within 1e-3 relative, greedy tokens identical for n = 0, 1,
middle, N; fp16 and bf16 greedy tokens) are skipped with the reason when no GPU with
TensorRT is present.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch_loader = pytest.importorskip("pmod_export.torch_loader")
import torch_guard  # noqa: E402
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
MISBOUND, _torch_usable, test_in_a_fresh_process = torch_guard.guard(__file__)

import onnx  # noqa: E402
from builders import copy_dir, edit_manifest, tiny_checkpoint, tiny_config, tiny_next  # noqa: E402
from trt_fakes import GPU, TRT_ALIGN, TRT_VERSION, FakeCudart, make_fake_tensorrt  # noqa: E402

import pmod  # noqa: E402
from pmod.app.cli import main  # noqa: E402
from pmod.errors import PmodError  # noqa: E402
from pmod.schedule import capacities  # noqa: E402
from pmod.static import contract  # noqa: E402
from pmod_export.ort_engine import OrtEngine  # noqa: E402
from pmod_trt import build as trt_build  # noqa: E402
from pmod_trt import cuda as trt_cuda  # noqa: E402
from pmod_trt import deps  # noqa: E402
from pmod_trt.manifest import check_compatible, read_engine_manifest, read_trt_export  # noqa: E402
from pmod_trt.profiles import (OPT_HISTORY, OPT_TEXT, Profile, all_profiles, dimension_ranges,  # noqa: E402
                               select_profile, vision_limits)

N = 20
CONTEXT = 1024
BUCKETS = [5, 12, 20]
NEXT = tiny_next(max_position_embeddings=CONTEXT)
VISION = NEXT["vision_config"]


class TrtGraphsOnOrt(OrtEngine):
    """``--target trt`` graphs run by ONNX Runtime: the answers the TensorRT backend must give."""

    targets = ("trt",)


# ============================================================================= fakes
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
    """Skip the lint where a test is about something else (it has its own tests)."""
    calls = []
    monkeypatch.setattr(trt_build, "run_lint", lambda d: calls.append(d))
    return calls


# ============================================================================= fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch_guard.skip_if(MISBOUND)
    config, tensors, path = tiny_checkpoint(tmp_path_factory.mktemp("trt"), seed=0, tokenizer=True, **NEXT)
    return config, path, tensors


@pytest.fixture(scope="module")
def exported(ckpt):
    from pmod_export.onnx_export import export_onnx

    return export_onnx(ckpt[1], ckpt[1].parent / "onnx", N, target="trt")


@pytest.fixture(scope="module")
def exported_buckets(ckpt):
    from pmod_export.onnx_export import export_onnx

    return export_onnx(ckpt[1], ckpt[1].parent / "onnx-buckets", target="trt", buckets=BUCKETS)


@pytest.fixture(scope="module")
def reference(exported):
    """ONNX Runtime on the same graphs: what the TensorRT backend mirrors."""
    return TrtGraphsOnOrt(exported, threads=1)


@pytest.fixture(scope="module")
def reference_buckets(exported_buckets):
    return TrtGraphsOnOrt(exported_buckets, threads=1)


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


def router_paths(model) -> tuple[set[str], set[str]]:
    """``(routers, nodes on a path from a router to a TopK)``, from the graph alone.

    Routers: MatMuls whose weight (input 1) is an initializer with one output feature. A path
    runs forward from a router and ends at a TopK without passing another router or TopK
    (past those it is another layer's routing, or a selection's indices).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    producer = {o: n.name for n in g.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    routers = {n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits
               and list(inits[n.input[1]].dims[-1:]) == [1]}
    on_path = set()
    for r in routers:
        reach, frontier = {r}, [r]
        while frontier:
            for out in nodes[frontier.pop()].output:
                for c in consumers.get(out, []):
                    if c not in reach:
                        reach.add(c)
                        if nodes[c].op_type != "TopK" and c not in routers:
                            frontier.append(c)
        back = {n for n in reach if nodes[n].op_type == "TopK"}
        frontier = list(back)
        while frontier:
            for i in nodes[frontier.pop()].input:
                p = producer.get(i)
                if p in reach and p not in back:
                    back.add(p)
                    frontier.append(p)
        on_path |= back
    return routers, on_path


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


def test_build_refused_for_an_onnx_runtime_export(exported, tmp_path, fakes, capsys):
    """An export for ONNX Runtime (--target ort: its fused attention) is not built: one line naming --target trt."""
    trt, _ = fakes.default
    d = copy_dir(exported, tmp_path, "ort")
    edit_manifest(d, lambda m: m.update(target="ort"))
    assert main(["trt", "build", "--onnx", str(d), "--out", str(tmp_path / "eng")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exported for ONNX Runtime (--target ort" in err[0], err
    assert "'pmod export onnx --target trt'" in err[0]
    assert trt.built == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ort"]


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


def test_tensorrt_version_pinned(tmp_path, fakes):
    """TensorRT 10.1 up to 11 (exclusive), at run time and in the ``trt`` extra."""
    tomllib = pytest.importorskip("tomllib")

    for version in ("8.6.1", "10.0.1", "11.0.0"):
        fakes(trt=make_fake_tensorrt(version=version))
        with pytest.raises(PmodError) as e:
            deps.tensorrt("pmod trt build")
        assert str(e.value) == (f"pmod trt build is written for TensorRT 10.1 to 11 (exclusive), found {version}: "
                                "pip install 'tensorrt>=10.1,<11'")
    with pytest.raises(PmodError, match="the trt backend is written for TensorRT 10.1 to 11 .*found 11.0.0"):
        pmod.open_engine(tmp_path, backend="trt")
    trt, _ = fakes(trt=make_fake_tensorrt(version="10.9.0.34"))
    assert deps.tensorrt("pmod trt build") is trt
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "tensorrt>=10.1,<11" in pyproject["project"]["optional-dependencies"]["trt"]


# ============================================================================= profiles
def test_profiles_from_the_export(ckpt, exported, exported_buckets, monkeypatch):
    config = ckpt[0]
    export = read_trt_export(exported)
    T, caps = CONTEXT, capacities(config, N)
    assert export.max_context == T and export.capacities == caps == [20, 20, 13, 6, 3, 3]
    profiles = all_profiles(export)
    assert {g: [p.name for p in ps] for g, ps in profiles.items()} == {
        "embed": ["tokens"], "vision": ["image"], "prefill": ["first", "later"], "decode": ["step", "chunk"]}
    buckets = read_trt_export(exported_buckets)
    bucket_profiles = all_profiles(buckets)
    assert {g: [p.name for p in ps] for g, ps in bucket_profiles.items() if g.startswith("prefill")} == {
        "prefill_5": ["first", "later"], "prefill_12": ["first", "later"], "prefill_20": ["first", "later"]}
    for m, table in ((export, profiles), (buckets, bucket_profiles)):  # exactly the dynamic inputs, min <= opt <= max
        for g, ps in table.items():
            dynamic = {t.name for t in m.graphs[g].inputs if not all(isinstance(d, int) for d in t.shape)}
            for p in ps:
                assert set(p.shapes) == dynamic, (g, p.name)
                for lo, opt, hi in p.shapes.values():
                    assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    H, kv = config.hidden_size, [config.num_key_value_heads, config.head_dim]
    (embed,), (vision,), (first, later), (step, chunk) = (profiles[g] for g in ("embed", "vision", "prefill", "decode"))
    assert embed.shapes["input_ids"] == ([1, 1], [1, OPT_TEXT], [1, T])
    # prefill: text 0..T-1 (a chunk with n >= 1 vision tokens), vision 1..N, carriers 0..K; first: no past
    for p in (first, later):
        assert p.shapes["text_embeds"] == ([1, 0, H], [1, OPT_TEXT, H], [1, T - 1, H])
        assert p.shapes["vision_embeds"] == ([1, 1, H], [1, N, H], [1, N, H])
        assert p.shapes["vision_positions"] == ([1, 1], [1, N], [1, N])
        assert {k: v for k, v in p.shapes.items() if k.startswith("keep_")} == {
            f"keep_{l}_0": ([0], [caps[l]], [caps[l]]) for l in range(2, 6)}  # one TopK stage per MoD layer
        assert "n_vision" not in p.shapes
    for l in range(6):
        assert first.shapes[f"past_key_{l}"] == ([1, 0] + kv,) * 3
        assert first.shapes[f"past_positions_{l}"] == ([1, 0],) * 3
        assert later.shapes[f"past_key_{l}"] == ([1, 0] + kv, [1, OPT_HISTORY + caps[l]] + kv, [1, T - 1] + kv)
        assert later.shapes[f"past_positions_{l}"] == ([1, 0], [1, OPT_HISTORY + caps[l]], [1, T - 1])
    # buckets: the vision stream and n_vision are static; text and past as in the shape form
    b_first, b_later = bucket_profiles["prefill_12"]
    assert b_first.shapes["text_embeds"] == first.shapes["text_embeds"]
    assert not {"vision_embeds", "vision_positions", "n_vision"} & set(b_first.shapes)
    past = lambda p: {k: v for k, v in p.shapes.items() if k.startswith("past_")}  # noqa: E731
    assert past(b_first) == past(first) and past(b_later) == past(later)
    # decode step: one token; each layer tuned for its own KV length (MoD layers hold fewer)
    assert step.shapes["text_embeds"] == ([1, 1, H],) * 3
    opts = [step.shapes[f"past_key_{l}"][1][1] for l in range(6)]
    assert opts == [OPT_HISTORY + c for c in caps] == [276, 276, 269, 262, 259, 259]
    assert all(step.shapes[f"past_key_{l}"][2][1] == T - 1 for l in range(6))  # a text-only context fills every layer
    assert chunk.shapes["text_positions"] == ([1, 1], [1, OPT_TEXT], [1, T])
    assert chunk.shapes["past_key_0"] == ([1, 0] + kv, [1, 0] + kv, [1, T - 1] + kv)
    # vision: up to the largest image: base + a 2x2 grid = 5 tiles, 4 + 4 rows of (4 + newline) = 24 tokens
    assert vision.shapes["pixel_values"] == ([1, 3, 28, 28], [5, 3, 28, 28], [5, 3, 28, 28])
    assert vision.shapes["feature_index"] == ([1], [24], [24])
    # a selection past the TopK limit is split into stages; each carrier ranges over its stage's share
    monkeypatch.setattr(contract, "TOPK_STAGE", 5)
    dims = dimension_ranges(export, "prefill", "first")
    assert {k: v for k, v in dims.items() if k.startswith("keep_")} == {
        "keep_2_0": (0, 5, 5), "keep_2_1": (0, 5, 5), "keep_2_2": (0, 3, 3), "keep_3_0": (0, 5, 5),
        "keep_3_1": (0, 1, 1), "keep_4_0": (0, 3, 3), "keep_5_0": (0, 3, 3)}


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
    profiles = all_profiles(read_trt_export(exported))
    step, chunk = profiles["decode"]
    first, later = profiles["prefill"]
    kv = lambda past: {**{f"past_{k}_{l}": (1, past, 2, 8) for l in range(6) for k in ("key", "value")},  # noqa: E731
                       **{f"past_positions_{l}": (1, past) for l in range(6)}}
    text = lambda t: {"text_embeds": (1, t, 32), "text_positions": (1, t)}  # noqa: E731
    assert select_profile([step, chunk], {**text(1), **kv(500)}) == 0
    assert select_profile([step, chunk], {**text(7), **kv(0)}) == 1
    assert select_profile([step, chunk], {**text(1), **kv(CONTEXT)}) is None  # past beyond T - 1
    assert select_profile([step, chunk], {**text(1), **kv(3), "past_key_2": (1, 4, 2, 8)}) == 0
    vision = {"vision_embeds": (1, 9, 32), "vision_positions": (1, 9), **{f"keep_{l}_0": (1,) for l in range(2, 6)}}
    assert select_profile([first, later], {**text(10), **vision, **kv(0)}) == 0  # a prompt on an empty cache
    assert select_profile([first, later], {**text(10), **vision, **kv(40)}) == 1  # a chunk on earlier turns
    assert select_profile([first, later], {**text(10), **vision, **kv(0), "keep_5_0": (4,)}) is None  # K > C_5
    for p in (step, chunk, first, later):
        assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_unknown_dimension_refused(exported, tmp_path):
    d = copy_dir(exported, tmp_path, "onnx")
    edit_manifest(d, lambda m: m["graphs"]["decode"]["inputs"][0].update(shape=[1, "chunk_len", 32]))
    with pytest.raises(PmodError, match="dimension 'chunk_len' that pmod_trt does not know"):
        all_profiles(read_trt_export(d))


# ============================================================================= precision
def test_build_plan():
    plan = trt_build.build_plan
    assert plan("fp32", "float32").strongly_typed and plan("fp16", "float16").strongly_typed
    bf16 = plan("bf16", "float32")
    assert (bf16.strongly_typed, bf16.flag, bf16.pin_fp32) == (False, "BF16", True)
    with pytest.raises(PmodError, match="the export is float16; fp32 engines need a float32 export: "
                                        "re-export with 'pmod export onnx --dtype float32'"):
        plan("fp32", "float16")
    with pytest.raises(PmodError, match="--dtype float16"):
        plan("fp16", "float32")
    with pytest.raises(PmodError, match="bf16 engines are built from a float32 export"):
        plan("bf16", "float16")
    with pytest.raises(PmodError, match="--precision 'int8' is not supported: choose one of fp32, fp16, bf16"):
        plan("int8", "float32")


def test_keep_fp32_is_the_norms(exported):
    keep = trt_build.keep_fp32
    for g in ("prefill", "decode", "vision"):
        nodes = onnx.load(str(exported / f"{g}.onnx"), load_external_data=False).graph.node
        for n in nodes:
            if n.op_type in ("ReduceMean", "LayerNormalization"):  # RMSNorm variance, CLIP norms
                assert keep(n.name), n.name
            if n.op_type in ("MatMul", "TopK", "Tanh", "Softmax"):  # projections, routing (by data flow), attention
                assert not keep(n.name), n.name
        assert any(keep(n.name) for n in nodes), g
    assert keep("/norm/Mul_1") and keep("/input_layernorm_3/Pow") and keep("/tower/layers.1/layer_norm2/Div")
    assert keep("/tower/pre_layrnorm/Sub") and not keep("/Tanh_3") and not keep("/TopK_2")
    assert not keep("/router_1/MatMul") and not keep("ONNXTRT_ShapeTensorFromDims_12")
    assert not keep("/self_attn_2/Softmax") and not keep("/mlp/normalize_proj/MatMul")


@pytest.mark.parametrize("graph", ["prefill", "prefill_12", "prefill_5"])
def test_routing_nodes_cover_router_to_topk(ckpt, exported, exported_buckets, graph):
    """Every node on a path from a router to its TopK is pinned (the bucket padding Where too); no projection is."""
    model = onnx.load(str((exported if graph == "prefill" else exported_buckets) / f"{graph}.onnx"),
                      load_external_data=False)
    ops = {n.name: n.op_type for n in model.graph.node}
    routers, on_path = router_paths(model)
    routing = trt_build.routing_nodes(model)
    topks = {n for n, op in ops.items() if op == "TopK"}
    slots = N if graph == "prefill" else int(graph.split("_")[1])
    kept_layers = sum(c > 0 for c in capacities(ckpt[0], slots)[2:])  # MoD layers with a TopK
    assert len(routers) == 4 and len(topks) == kept_layers and topks <= on_path
    assert on_path <= routing, sorted(on_path - routing)
    wheres = {n for n in on_path if ops[n] == "Where"}  # bucket padding: slots past n_vision score -inf
    assert len(wheres) == (0 if graph == "prefill" else kept_layers)
    assert not {n for n in routing if ops[n] in ("MatMul", "Gemm")} - routers  # no q/k/v/o/gate/up/down/lm_head


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
    export = read_trt_export(exported)
    assert (m.format, m.target, m.form, m.dtype) == ("pmod-trt", "trt", "shape", "float32")
    assert m.engine == {"tensorrt_version": TRT_VERSION, "gpu": {"name": GPU, "compute_capability": "9.0"},
                        "precision": "fp32", "build": {
                            "strongly_typed": True, "flag": None, "workspace_gb": 1.5, "timing_cache": "timing.cache",
                            "tf32": False, "source": str(exported.resolve())}}
    assert m.capacities == [20, 20, 13, 6, 3, 3] and m.max_context == CONTEXT and m.max_vision_tokens == N
    assert (m.retention, m.kv, m.config) == (export.retention, export.kv, export.config)
    profiles = all_profiles(export)
    assert [Path(r["onnx"]).name for r in trt.built] == ["embed.onnx", "vision.onnx", "decode.onnx", "prefill.onnx"]
    for r in trt.built:  # what the builder was asked: strongly typed fp32, no TF32, the profiles, the pool
        g = Path(r["onnx"]).stem
        assert r["strongly_typed"] and r["flags"] == [] and r["cleared"] == ["TF32"] and r["pinned"] == []
        assert r["pool"] == int(1.5 * (1 << 30)) and r["preview"] == ["RUNTIME_ACTIVATION_RESIZE_10_10"]
        assert r["profiles"] == [{k: [list(x) for x in v] for k, v in p.shapes.items()} for p in profiles[g]]
        spec = m.graphs[g]
        assert (spec.file, spec.source, spec.external_data) == (f"{g}.engine", f"{g}.onnx", None)
        assert spec.profiles == profiles[g]
        assert (spec.inputs, spec.outputs) == (export.graphs[g].inputs, export.graphs[g].outputs)
    # one timing cache shared by every graph, started from --timing-cache and written back
    assert [r["cache"] for r in trt.built] == ["old:", "old:embed", "old:embedvision", "old:embedvisiondecode"]
    assert (out / "timing.cache").read_bytes() == cache.read_bytes() == b"old:embedvisiondecodeprefill+"
    # manifest round trip: the export's description with the engine fields, written and read back as is
    written = json.loads((out / "manifest.json").read_text())
    assert written["engine"] == m.engine and written["graphs"]["decode"]["source"] == "decode.onnx"
    assert written["manifest_version"] == 2 and "engines" not in written
    assert {k: v for k, v in written.items() if k not in ("format", "graphs", "engine")} == {
        k: v for k, v in export.to_dict().items() if k not in ("format", "graphs")}
    again = read_engine_manifest(out)
    assert again == m and again.to_dict() == m.to_dict() == written
    m.write(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text()) == written


def test_bucket_export_builds_every_bucket(exported_buckets, tmp_path, fakes, no_lint):
    trt, _ = fakes.default
    out = build(exported_buckets, tmp_path / "eng")
    graphs = ["embed", "vision", "decode", "prefill_5", "prefill_12", "prefill_20"]
    assert [Path(r["onnx"]).stem for r in trt.built] == graphs
    m = read_engine_manifest(out)
    assert (m.form, m.buckets, list(m.graphs)) == ("buckets", BUCKETS, graphs)
    profiles = all_profiles(read_trt_export(exported_buckets))
    assert all(m.graphs[g].profiles == profiles[g] and (out / f"{g}.engine").is_file() for g in graphs)


def test_bf16_pins_routing_and_norms(ckpt, exported, tmp_path, fakes, no_lint):
    trt, _ = fakes.default
    build(exported, tmp_path / "eng", precision="bf16")
    for r in trt.built:
        assert not r["strongly_typed"] and r["flags"] == ["BF16", "PREFER_PRECISION_CONSTRAINTS"]
    pinned = {Path(r["onnx"]).stem: set(r["pinned"]) for r in trt.built}
    model = onnx.load(str(exported / "prefill.onnx"), load_external_data=False)
    routing = trt_build.routing_nodes(model)
    _, on_path = router_paths(model)
    assert on_path <= pinned["prefill"]  # each carries float scores: router MatMul, bias, Gather, TopK
    assert all(name in routing or trt_build.keep_fp32(name) for name in pinned["prefill"])
    assert any("layernorm" in p for p in pinned["decode"]) and any("layer_norm" in p for p in pinned["vision"])
    assert all(trt_build.keep_fp32(p) for g in ("embed", "vision", "decode") for p in pinned[g])  # no routers there
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


def test_lint_runs_first_and_stops_the_build(exported, tmp_path, fakes, monkeypatch):
    """The lint runs in-process (no subprocess) before TensorRT builds anything."""
    import subprocess

    trt, _ = fakes.default

    def no_subprocess(*args, **kwargs):
        raise AssertionError("the lint runs in-process")

    for name in ("run", "Popen", "check_output", "check_call", "call"):
        monkeypatch.setattr(subprocess, name, no_subprocess)
    bad = tmp_path / "onnx"
    shutil.copytree(exported, bad)
    model = onnx.load(str(bad / "prefill.onnx"))
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    kept = [a for a in topk.attribute if a.name != "sorted"]
    del topk.attribute[:]
    topk.attribute.extend(kept + [onnx.helper.make_attribute("sorted", 0)])
    onnx.save(model, str(bad / "prefill.onnx"))
    with pytest.raises(PmodError, match=r"fails the TensorRT-compatibility lint \(1 finding\(s\), first: "
                                        r"prefill.onnx: .*TopK needs sorted=1.*nothing was built: "
                                        r"'pmod export lint .*onnx' lists them"):
        build(bad, tmp_path / "eng")
    assert trt.built == [] and sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    build(exported, tmp_path / "eng")  # the real lint passes on a clean export
    assert len(trt.built) == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PmodError, match=r"empty holds no .onnx files: pass an export directory or a .onnx file"):
        trt_build.run_lint(empty)


# ============================================================================= runtime (fakes)
@pytest.fixture
def engines_dir(exported, tmp_path, fakes, no_lint):
    return build(exported, tmp_path / "eng")


@pytest.fixture
def bucket_engines_dir(exported_buckets, tmp_path, fakes, no_lint):
    return build(exported_buckets, tmp_path / "eng-buckets")


def test_engines_refused_on_another_gpu_or_tensorrt(engines_dir, fakes):
    fakes(rt=FakeCudart(name="NVIDIA L4", cc=(8, 9)))
    with pytest.raises(PmodError) as e:
        pmod.open_engine(engines_dir, backend="trt")
    msg = str(e.value)
    assert "\n" not in msg and f"built with TensorRT {TRT_VERSION} on {GPU} (compute capability 9.0)" in msg
    assert f"this machine has TensorRT {TRT_VERSION} on NVIDIA L4 (compute capability 8.9)" in msg
    assert msg.endswith("rebuild it with 'pmod trt build --onnx EXPORT_DIR --out DIR' here")
    fakes(trt=make_fake_tensorrt(version="10.10.0.31"), rt=FakeCudart())
    with pytest.raises(PmodError, match=f"built with TensorRT {TRT_VERSION} .* this machine has TensorRT 10.10.0.31"):
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
        read_trt_export(engines_dir)
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
    m["graphs"]["decode"]["inputs"][1]["dtype"] = "int64"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PmodError, match=r"does not match decode.engine: input 'text_positions' is int32 .* in the "
                                        r"graph, int64 .* in the manifest; rebuild it"):
        pmod.open_engine(d, backend="trt")
    del m["engine"]["gpu"]
    m["graphs"]["decode"]["inputs"][1]["dtype"] = "int32"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PmodError, match="manifest.json lacks or mangles 'gpu'; rebuild it"):
        pmod.open_engine(d, backend="trt")
    with pytest.raises(PmodError, match="holds float32 graphs; for float16 re-export with 'pmod export onnx --dtype "
                                        "float16' and rebuild the engines"):
        pmod.open_engine(engines_dir, backend="trt", dtype="float16")


CASES = {"shape": [(0, "start"), (1, "end"), (9, "middle"), (N, "start")],
         "buckets": [(n, w) for n in (0, 1, 5, 6, 12, 13, 20) for w in ("start", "middle", "end")]}


@pytest.mark.parametrize("form", CASES)
def test_fake_engine_matches_onnx_runtime(ckpt, request, form):
    """The TensorRT backend's host logic on ONNX Runtime-backed fake engines: ORT's answers, bit for bit."""
    config = ckpt[0]
    suffix = "" if form == "shape" else "_buckets"
    e = pmod.open_engine(request.getfixturevalue("engines_dir" if form == "shape" else "bucket_engines_dir"),
                         backend="trt")
    reference = request.getfixturevalue("reference" + suffix)
    for n, where in CASES[form]:
        e.reset()
        reference.reset()
        inputs = chunk_inputs(config, n, where, seed=n + len(where))
        a, b = e.prefill(**inputs), reference.prefill(**inputs)
        assert np.abs(a - b).max() <= 1e-6, (n, where)
        assert e.kv_lengths() == reference.kv_lengths() and e.kv_bytes() == reference.kv_bytes()
        assert all(np.array_equal(p, q) for p, q in zip(e.kept_positions(), reference.kept_positions()))
        tok_a, tok_b = int(np.argmax(a)), int(np.argmax(b))
        for _ in range(3):  # greedy steps over the caches
            assert tok_a == tok_b
            a, b = e.decode(tok_a), reference.decode(tok_b)
            assert np.abs(a - b).max() <= 1e-6, (n, where)
            tok_a, tok_b = int(np.argmax(a)), int(np.argmax(b))
        more = chunk_inputs(config, 3, "middle", seed=99)  # a second chunk with vision tokens: the later profile
        assert np.abs(e.prefill(**more) - reference.prefill(**more)).max() <= 1e-6
        assert e.kv_lengths() == reference.kv_lengths() and e.position == reference.position
        assert all(np.array_equal(p, q) for p, q in zip(e.kept_positions(), reference.kept_positions()))
        assert e._contexts["prefill" if form == "shape" else "prefill_5"].profile == 1


@pytest.mark.parametrize("form", ["shape", "buckets"])
def test_full_context_fits_the_kv_buffers(ckpt, request, form):
    """A chunk with one vision token at the end of the context: a bucket's dense layers write B slots past the
    live prefix (their buffers carry that dead tail); the shape form writes exactly the live ones."""
    config = ckpt[0]
    suffix = "" if form == "shape" else "_buckets"
    e = pmod.open_engine(request.getfixturevalue("engines_dir" if form == "shape" else "bucket_engines_dir"),
                         backend="trt")
    reference = request.getfixturevalue("reference" + suffix)
    reference.reset()
    ids = np.random.default_rng(3).integers(3, config.vocab_size, CONTEXT - 11)
    assert np.abs(e.prefill(input_ids=ids) - reference.prefill(input_ids=ids)).max() <= 1e-5
    last = chunk_inputs(config, 1, "end", seed=4)
    assert np.abs(e.prefill(**last) - reference.prefill(**last)).max() <= 1e-5
    assert e.position == CONTEXT and e.kv_lengths() == reference.kv_lengths()
    slack = capacities(config, N) if form == "buckets" else [0] * 6
    assert e.cache.capacity == [CONTEXT + c for c in slack]
    with pytest.raises(PmodError, match="prompt too long"):
        e.decode(3)


def test_context_memory_follows_the_shapes(ckpt, engines_dir, fakes):
    """User-managed context memory: a short prompt's prefill gets what its shapes need, far below the
    profile maxima a statically allocated context would hold (text and past both T - 1)."""
    trt, _ = fakes.default
    config = ckpt[0]
    e = pmod.open_engine(engines_dir, backend="trt")
    user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    assert all(ctx.strategy == user_managed for ctx in e._contexts.values())
    e.prefill(**chunk_inputs(config, 5, "middle", seed=2))  # 10 text + 5 vision tokens, no past
    ctx, T, heads = e._contexts["prefill"], CONTEXT, config.num_attention_heads
    corner = heads * (T - 1 + N) * (2 * (T - 1) + N) * 4  # later: text T-1, vision N, past T-1
    assert ctx.engine.profile_bytes(1) == corner
    assert heads * 15 * 15 * 4 <= ctx.memory < corner / 100


def test_decode_moves_only_the_chunk_and_the_logits(ckpt, engines_dir, fakes):
    """No host copies of the caches: a decode step copies ids, embeddings and positions in, logits out;
    on the device, only the new entry of each tensor whose free space is not 256-byte aligned."""
    config = ckpt[0]
    _, rt = fakes.default
    e = pmod.open_engine(engines_dir, backend="trt")
    e.prefill(**chunk_inputs(config, N, "middle", seed=1))
    decode_ctx = e._contexts["decode"]
    H, V = config.hidden_size, config.vocab_size
    in_place = scratch = 0
    for token in (5, 6, 7, 8):  # every layer's free space moves by one entry per step
        lengths = e.kv_lengths()
        ends = {e.cache.store[l][j].ptr + n * size: size
                for l, n in enumerate(lengths) for j, size in enumerate(e.cache.sizes)}
        misaligned = {addr: size for addr, size in ends.items() if addr % TRT_ALIGN}
        rt.copies.clear()
        e.decode(token)
        h2d = sorted(n for k, n, _ in rt.copies if k == "h2d")
        d2h = sorted(n for k, n, _ in rt.copies if k == "d2h")
        d2d = [(dst, n) for k, n, dst in rt.copies if k == "d2d"]
        assert h2d == sorted([4, 4 * H, 4])  # the id; the embedding and its position
        assert d2h == sorted([4 * H, 4 * V])  # the embedding; the logits
        assert sorted(d2d) == sorted(misaligned.items())  # one entry each, to where the prefix ends
        assert e.kv_lengths() == [n + 1 for n in lengths]
        in_place, scratch = in_place + len(ends) - len(misaligned), scratch + len(misaligned)
    assert in_place and scratch  # 64-byte keys and values, 4-byte positions: both paths ran
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
    with pytest.raises(PmodError, match="at most 20: re-export with --max-vision-tokens 21 or more and rebuild "
                                        "the engines"):
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
    ref_dense = TrtGraphsOnOrt(exported, dense=True, threads=1)
    inputs = chunk_inputs(config, 9, "middle", seed=5)
    assert np.abs(dense.prefill(**inputs) - ref_dense.prefill(**inputs)).max() <= 1e-6
    assert dense.kv_lengths() == [19] * 6
    e.close()


def test_generate_through_the_trt_backend(engines_dir, exported, capsys, monkeypatch):
    """`pmod generate --backend trt` on the engine directory (tokenizer copied by the build), against
    ONNX Runtime running the same graphs."""
    args = ["generate", "--prompt", "what colour is the circle ?", "--max-tokens", "4"]
    assert main(args + ["--model", str(engines_dir), "--backend", "trt"]) == 0
    got = capsys.readouterr().out
    monkeypatch.setattr(OrtEngine, "targets", TrtGraphsOnOrt.targets)
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

    return export_onnx(ckpt[1], ckpt[1].parent / "onnx16", N, dtype="float16", target="trt")


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
        if str(e).startswith("bf16 needs"):  # compute capability < 8.0
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
    m["engine"]["gpu"]["name"] = "Another GPU"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PmodError, match="engines run only where they were built"):
        pmod.open_engine(out, backend="trt")
