"""The static-graph contract (pmod.static): graphs whose shapes follow the vision count, exhaustively.

On a tiny LLaVA-NeXT-style p-MoD (6 layers, MoD layers 2..5) exported for N = 12, every
n in 0..N with the vision block at the start, middle and end of a 6-token prompt runs
through ONNX Runtime on the three graph kinds an export can hold (``--target ort`` with
ONNX Runtime's fused attention, ``--target trt`` with the plain pattern, and ``--buckets``
with constant TopKs) and must equal the float64 reference (tests/reference.py): logits to
1e-4, the kept positions of every layer, KV lengths and greedy tokens. Around it: one
export at N answers as an export at N = n, the host-side plan, the manifest's refusals,
the 256-byte alignment of every device address ONNX Runtime binds, the last-token Gather,
and float32 router logits in float16 graphs.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch_loader = pytest.importorskip("pmod_export.torch_loader")
import torch_guard  # noqa: E402
torch = torch_loader.torch
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
MISBOUND, _torch_usable, test_in_a_fresh_process = torch_guard.guard(__file__)

from builders import copy_dir, edit_manifest, tiny_checkpoint, tiny_next, vision_inputs  # noqa: E402
from reference import Reference  # noqa: E402

import pmod  # noqa: E402
from pmod.app.cli import main  # noqa: E402
from pmod.errors import PmodError  # noqa: E402
from pmod.schedule import capacities, kept_count, layer_ratios  # noqa: E402
from pmod.static import contract  # noqa: E402
from pmod.static.cache import ALIGN  # noqa: E402
from pmod.static.chunk import Planner  # noqa: E402
from pmod_export.onnx_export import export_onnx  # noqa: E402
from pmod_export.ort_engine import OrtEngine  # noqa: E402

N = 12
TEXT = 6
BUCKETS = [3, 7, 12]
TOL = 1e-4
NEXT = tiny_next(max_position_embeddings=128, vision_layers=2)
WHERE = ("start", "middle", "end", "alone")  # alone: a chunk of vision tokens only


class TrtGraphsOnOrt(OrtEngine):
    """``--target trt`` graphs run by ONNX Runtime: what TensorRT would run, on the CPU."""

    targets = ("trt",)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch_guard.skip_if(MISBOUND)
    return tiny_checkpoint(tmp_path_factory.mktemp("static"), seed=2, **NEXT)


@pytest.fixture(scope="module")
def exports(ckpt):
    path = ckpt[2]
    root = path.parent
    return {"ort": export_onnx(path, root / "ort", N),
            "trt": export_onnx(path, root / "trt", N, target="trt"),
            "buckets": export_onnx(path, root / "buckets", target="trt", buckets=BUCKETS)}


@pytest.fixture(scope="module")
def engines(exports):
    return {"ort": OrtEngine(exports["ort"], threads=1), "trt": TrtGraphsOnOrt(exports["trt"], threads=1),
            "buckets": TrtGraphsOnOrt(exports["buckets"], threads=1)}


def layout(n: int, where: str) -> np.ndarray:
    if where == "alone":
        return np.ones(n, dtype=bool)
    start = {"start": 0, "middle": TEXT // 2, "end": TEXT}[where]
    vm = np.zeros(TEXT + n, dtype=bool)
    vm[start:start + n] = True
    return vm


def prompt(config, tensors, n: int, where: str):
    vm = layout(n, where)
    rng = np.random.default_rng([n, len(where)])
    return vision_inputs(tensors, rng.integers(3, config.vocab_size, vm.size), vm, seed=n), vm


def margin(values: np.ndarray, k: int) -> float:
    s = np.sort(values)[::-1]
    return float(s[k - 1] - s[k])


# ----------------------------------------------------------------------------- exhaustive
@pytest.mark.parametrize("n", range(N + 1))
def test_every_vision_count_matches_the_reference(ckpt, engines, n):
    """For every n <= N, start/middle/end: each graph kind gives the float64 reference's answers."""
    config, tensors, _ = ckpt
    for where in WHERE if n else WHERE[:1]:
        what = f"n={n} {where}"
        emb, vm = prompt(config, tensors, n, where)
        ref = Reference(config, tensors)
        want = [ref.prefill(embeds=emb, vision_mask=vm)[-1]]
        vidx = np.nonzero(vm)[0]
        for l, kept in enumerate(ref.kept):  # discrete choices must not be near-ties here
            if kept is not None and 0 < len(kept) < n:
                assert margin(ref.scores[l][vidx], len(kept)) > 1e-4, f"{what}: layer {l} router near-tie"
        held = [np.sort(c["positions"]).tolist() for c in ref.cache]
        lengths = ref.kv_lengths()
        tokens = [int(np.argmax(want[0]))]
        for _ in range(2):
            assert margin(want[-1], 1) > 1e-3, f"{what}: greedy near-tie"
            want.append(ref.decode(tokens[-1]))
            tokens.append(int(np.argmax(want[-1])))
        for name, e in engines.items():
            e.reset()
            got = [e.prefill(inputs_embeds=emb, vision_mask=vm)]
            assert e.kv_lengths() == lengths, (name, what)
            assert [p.tolist() for p in e.kept_positions()] == held, (name, what)
            toks = [int(np.argmax(got[0]))]
            for _ in range(2):
                got.append(e.decode(toks[-1]))
                toks.append(int(np.argmax(got[-1])))
            assert toks == tokens, (name, what)
            err = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
            assert err <= TOL, f"{name} {what}: logits max err {err:.3g}"


def test_one_export_at_n_answers_as_an_export_at_n(ckpt, engines, tmp_path):
    config, tensors, path = ckpt
    small = OrtEngine(export_onnx(path, tmp_path / "n5", 5), threads=1)
    emb, vm = prompt(config, tensors, 5, "middle")
    for e in (engines["ort"], small):
        e.reset()
    a, b = engines["ort"].prefill(inputs_embeds=emb, vision_mask=vm), small.prefill(inputs_embeds=emb, vision_mask=vm)
    assert np.abs(a - b).max() <= 1e-6 and engines["ort"].kv_lengths() == small.kv_lengths()


# ----------------------------------------------------------------------------- host plan
def test_planner_streams_carriers_and_buckets(ckpt):
    config, _, _ = ckpt
    emb = np.arange(10 * config.hidden_size, dtype=np.float32).reshape(10, -1)
    vm = np.zeros(10, bool)
    vm[2:7] = True
    step = Planner(config, N).plan(emb, vm, start=3)
    assert step.graph == "prefill" and step.length == 10
    assert step.feeds["vision_positions"].tolist() == [[5, 6, 7, 8, 9]]
    assert step.feeds["text_positions"].tolist() == [[3, 4, 10, 11, 12]]
    kept = capacities(config, 5)
    for l, r in enumerate(layer_ratios(config)):
        if r is not None:
            assert step.feeds[f"keep_{l}_0"].shape == (kept_count(5, r),)
    assert step.slots == step.live == [5 + k for k in kept]
    b = Planner(config, N, buckets=BUCKETS).plan(emb, vm, start=0)
    assert b.graph == "prefill_7" and b.feeds["vision_embeds"].shape == (1, 7, config.hidden_size)
    assert b.feeds["n_vision"].tolist() == [5] and b.slots == [5 + c for c in capacities(config, 7)]
    assert b.live == [5 + k for k in kept]
    assert Planner(config, N).plan(emb, np.zeros(10, bool), 0).graph == "decode"
    with pytest.raises(PmodError, match="13 routed vision tokens .* at most 12: re-export with --max-vision-tokens 13"):
        Planner(config, N).plan(np.zeros((13, config.hidden_size), np.float32), np.ones(13, bool), 0)


def test_split_selection_below_the_topk_limit(ckpt, tmp_path, monkeypatch):
    """A selection of TOPK_STAGE or more is split into TopKs each below the limit: same answers."""
    config, tensors, path = ckpt
    monkeypatch.setattr(contract, "TOPK_STAGE", 3)
    stages = contract.layer_stages(config, N)
    assert stages == [None, None] + [contract.topk_stages(c) for c in capacities(config, N)[2:]]
    assert max(s for s in stages if s) > 1 and contract.stage_sizes(8, 3) == [3, 3, 2]
    out = export_onnx(path, tmp_path / "split", N, target="trt")
    model = onnx.load(str(out / "prefill.onnx"))
    assert [n.op_type for n in model.graph.node].count("TopK") == sum(s for s in stages if s)
    from pmod.static.lint import lint_path

    assert lint_path(out) == []
    e, ref = TrtGraphsOnOrt(out, threads=1), Reference(config, tensors)
    emb, vm = prompt(config, tensors, N, "middle")
    assert np.abs(e.prefill(inputs_embeds=emb, vision_mask=vm) - ref.prefill(embeds=emb, vision_mask=vm)[-1]).max() <= TOL
    assert e.kv_lengths() == ref.kv_lengths()


# ----------------------------------------------------------------------------- graphs
def test_graphs_per_target(exports, ckpt):
    config = ckpt[0]
    from pmod_export.decoder import QUERY_BLOCKS

    ops = {t: [n.op_type for n in onnx.load(str(exports[t] / "prefill.onnx")).graph.node] for t in ("ort", "trt")}
    L = config.num_hidden_layers
    assert ops["ort"].count("MultiHeadAttention") == L * QUERY_BLOCKS and "Softmax" not in ops["ort"]
    decode = [n.op_type for n in onnx.load(str(exports["ort"] / "decode.onnx")).graph.node]
    assert decode.count("MultiHeadAttention") == L  # decode steps: one call, nothing to block
    assert "MultiHeadAttention" not in ops["trt"] and ops["trt"].count("Softmax") == config.num_hidden_layers
    for t in ("ort", "trt"):
        graph = onnx.load(str(exports[t] / "prefill.onnx")).graph
        routing = [n for n in graph.node if n.op_type == "TopK" and all(a.name != "largest" or a.i for a in n.attribute)]
        assert len(routing) == 4 and ops[t].count("ArgMax") == 1  # one per MoD layer; the last token
    assert ops["ort"].count("TopK") == 4 + 2 * L and ops["trt"].count("TopK") == 4  # ort: each layer sorts by position, and back
    trt = onnx.load(str(exports["trt"] / "prefill.onnx"))
    inferred = onnx.shape_inference.infer_shapes(trt)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    scatters = [n for n in trt.graph.node if n.op_type == "ScatterElements"]  # int32 indices, as TensorRT prefers
    assert len(scatters) == 4 and all(types[n.input[1]] == onnx.TensorProto.INT32 for n in scatters)
    m = json.loads((exports["trt"] / "manifest.json").read_text())
    assert m["target"] == "trt" and m["form"] == "shape" and m["manifest_version"] == 2
    outs = {t["name"]: t["shape"] for t in m["graphs"]["prefill"]["outputs"]}
    assert outs["new_key_0"] == [1, "text_len+vision_len", 2, 8] and outs["new_key_2"] == [1, "text_len+keep_2_0", 2, 8]
    ins = {t["name"]: t for t in m["graphs"]["prefill"]["inputs"]}
    assert ins["keep_3_0"] == {"name": "keep_3_0", "dtype": "bool", "shape": ["keep_3_0"]} and "n_vision" not in ins
    b = json.loads((exports["buckets"] / "manifest.json").read_text())
    assert b["form"] == "buckets" and b["buckets"] == BUCKETS and b["max_vision_tokens"] == N
    assert sorted(b["graphs"]) == sorted(["embed", "vision", "decode"] + [f"prefill_{x}" for x in BUCKETS])


def test_last_token_is_gathered_not_one_hot(tmp_path):
    """An inf in a slot that is not the last one leaves the last position's row finite."""
    from pmod_export.decoder import last_hidden

    class Last(torch.nn.Module):
        def forward(self, h, pos):
            return last_hidden(h, pos)

    f = tmp_path / "last.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Last(), (torch.zeros(1, 4, 3), torch.arange(4, dtype=torch.int32)[None]), str(f),
                          dynamo=False, opset_version=contract.OPSET, input_names=["h", "pos"], output_names=["o"],
                          dynamic_axes={"h": {1: "s"}, "pos": {1: "s"}})
    h = np.ones((1, 4, 3), np.float32)
    h[0, 1] = np.inf
    out = ort.InferenceSession(str(f)).run(None, {"h": h, "pos": np.array([[7, 9, 11, -1]], np.int32)})[0]
    assert out.shape == (1, 1, 3) and np.isfinite(out).all()


def test_router_logits_float32_in_float16_graphs(ckpt, tmp_path):
    config, _, path = ckpt
    out = export_onnx(path, tmp_path / "fp16", N, dtype="float16", target="trt")
    model = onnx.load(str(out / "prefill.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(model.graph.input)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    inits = {t.name: t for t in model.graph.initializer}
    routers = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
               and inits[n.input[1]].dims[-1] == 1]
    assert len(routers) == 4
    for n in routers:
        assert {types[i] for i in n.input} == {onnx.TensorProto.FLOAT}, n.name
        assert types[n.output[0]] == onnx.TensorProto.FLOAT


# ----------------------------------------------------------------------------- device buffers
def test_device_kv_binds_aligned_addresses(ckpt, exports, engines, monkeypatch):
    """ONNX Runtime's device path (CUDA's) binds only 256-byte aligned KV addresses, and answers as the host path."""
    config, tensors, _ = ckpt
    host = engines["ort"]
    host.reset()
    emb, vm = prompt(config, tensors, 9, "middle")
    steps = (5, 6, 7)  # every layer's free space moves by one entry per step
    want = [host.prefill(inputs_embeds=emb, vision_mask=vm)] + [host.decode(t) for t in steps]
    e = OrtEngine(exports["ort"], device_kv=True, threads=1)
    seen = []
    for method in ("bind_input", "bind_output"):
        original = getattr(ort.IOBinding, method)

        def record(self, name, device, device_id, dtype, shape, ptr, _original=original):
            seen.append((name, ptr))
            return _original(self, name, device, device_id, dtype, shape, ptr)

        monkeypatch.setattr(ort.IOBinding, method, record)
    got = [e.prefill(inputs_embeds=emb, vision_mask=vm)] + [e.decode(t) for t in steps]
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) <= 1e-6
    assert e.kv_lengths() == host.kv_lengths()
    assert [p.tolist() for p in e.kept_positions()] == [p.tolist() for p in host.kept_positions()]
    kv = [(name, ptr) for name, ptr in seen if name.startswith(("past_", "new_"))]
    assert kv and all(ptr % ALIGN == 0 for _, ptr in kv), [x for x in kv if x[1] % ALIGN][:3]


# ----------------------------------------------------------------------------- bad input
def test_refusals(ckpt, exports, tmp_path, capsys):
    config, tensors, path = ckpt
    e = OrtEngine(exports["ort"], threads=1)
    emb, vm = prompt(config, tensors, N + 1, "start")
    with pytest.raises(PmodError, match=f"{N + 1} routed vision tokens .* at most {N}: re-export with "
                                        f"--max-vision-tokens {N + 1}"):
        e.prefill(inputs_embeds=emb, vision_mask=vm)
    assert e.position == 0
    d = copy_dir(exports["ort"], tmp_path, "v1")
    edit_manifest(d, lambda m: m.update(manifest_version=1))
    with pytest.raises(PmodError, match="manifest version 1 .written by an older pmod.*re-export it"):
        OrtEngine(d)
    with pytest.raises(PmodError, match=r"exported for TensorRT \(--target trt\).*'pmod export onnx --target ort'"):
        pmod.open_engine(exports["trt"], backend="onnx")
    d = copy_dir(exports["buckets"], tmp_path, "unordered")
    edit_manifest(d, lambda m: m.update(buckets=[7, 3, 12]))
    with pytest.raises(PmodError, match=r"buckets \[7, 3, 12\] must increase"):
        TrtGraphsOnOrt(d)
    for buckets, match in (("7,3,12", "strictly increasing"), ("3,7,x", "whole numbers"),
                           ("3,7", "must end at --max-vision-tokens 12")):
        args = ["export", "onnx", "--model", str(path), "--out", str(tmp_path / "b"), "--buckets", buckets,
                "--max-vision-tokens", "12"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "b").exists()
    assert main(["export", "lint", str(exports["ort"])]) == 2
    assert "--target trt" in capsys.readouterr().err
