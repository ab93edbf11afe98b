"""pmod_export: the static-capacity torch model, its ONNX export and the ONNX Runtime engine.

Every backend (torch static form, ONNX Runtime on the exported graphs, MLX) is checked
against the independent float64 reference (tests/reference.py) and against each other on
a tiny LLaVA-NeXT-style p-MoD checkpoint with a CLIP tower (6 layers, MoD layers 2..5,
capacities 13, 6, 3, 3 at N = 20), for n = 0, 1, 9 and N routed vision tokens placed at the
start, middle and end of the chunk, then greedy decoding and a second chunk over the caches.

Tolerances (as tests/test_mlx_lm.py): float32 against the float64 reference and against
each other, 1e-4 absolute on logits (measured ~1e-6). Routing and argmax are discrete, so
each case first asserts, on the reference, that no MoD layer has a near-tie at its top-k
boundary and that greedy steps have a clear top-1 margin.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings

import numpy as np
import pytest

# conftest has put pmod_mlx's OpenBLAS in the global symbol scope: torch must come through
# pmod_export.torch_loader, which keeps torch on its own BLAS (see there).
torch_loader = pytest.importorskip("pmod_export.torch_loader")
import torch_guard  # noqa: E402
torch = torch_loader.torch
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
MISBOUND, _torch_usable, test_in_a_fresh_process = torch_guard.guard(__file__)

import onnx  # noqa: E402
from builders import (copy_dir, edit_manifest, random_tensors, tiny_checkpoint, tiny_config,  # noqa: E402
                      tiny_next, vision_inputs)
from reference import Reference  # noqa: E402

import pmod  # noqa: E402
from pmod.app.cli import main  # noqa: E402
from pmod.errors import PmodError  # noqa: E402
from pmod.format import save_checkpoint  # noqa: E402
from pmod.image import preprocess  # noqa: E402
from pmod.schedule import capacities  # noqa: E402
from pmod.app.session import Reply, Session, open_session  # noqa: E402
from pmod_export import decoder as static_decoder  # noqa: E402
from pmod_export import onnx_export  # noqa: E402
from pmod.static.contract import one_image_vision_tokens  # noqa: E402
from pmod.static.lint import lint_path  # noqa: E402
from pmod_export.onnx_export import export_onnx  # noqa: E402

TOL = 1e-4
ROUTE_MARGIN = 1e-4
ARGMAX_MARGIN = 1e-3
N = 20
HAS_MLX = importlib.util.find_spec("mlx") is not None
BACKENDS = ["torch", "onnx"] + (["mlx"] if HAS_MLX else [])

NEXT = tiny_next(max_position_embeddings=256)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(config, tensors, path) of a tiny LLaVA-NeXT p-MoD checkpoint with its CLIP tower."""
    torch_guard.skip_if(MISBOUND)
    return tiny_checkpoint(tmp_path_factory.mktemp("export"), seed=0, tokenizer=True, **NEXT)


@pytest.fixture(scope="module")
def exported(ckpt):
    out = ckpt[2].parent / "onnx"
    return export_onnx(ckpt[2], out, N)


@pytest.fixture(scope="module")
def engines(ckpt, exported):
    path = ckpt[2]
    out = {"torch": pmod.open_engine(path, backend="torch", max_vision_tokens=N),
           "onnx": pmod.open_engine(exported, backend="onnx")}
    if HAS_MLX:
        out["mlx"] = pmod.open_engine(path, backend="mlx", dtype="float32")
    return out


def layout(n: int, where: str, text: int = 10) -> np.ndarray:
    """A chunk of ``text + n`` tokens with its ``n`` vision tokens at the start, middle or end."""
    start = {"start": 0, "middle": text // 2, "end": text}[where]
    vm = np.zeros(text + n, dtype=bool)
    vm[start:start + n] = True
    return vm


def check_route_margins(ref: Reference, vm: np.ndarray, what: str) -> None:
    vidx = np.nonzero(vm)[0]
    for l, kept in enumerate(ref.kept):
        if kept is None or len(kept) in (0, len(vidx)):
            continue
        s = np.sort(ref.scores[l][vidx])[::-1]
        gap = s[len(kept) - 1] - s[len(kept)]
        assert gap > ROUTE_MARGIN, f"{what}: layer {l} router near-tie ({gap:.2g}); choose another seed"


def check_argmax_margin(logits: np.ndarray, what: str) -> None:
    top = np.sort(logits)[-2:]
    assert top[1] - top[0] > ARGMAX_MARGIN, f"{what}: argmax near-tie; choose another seed"


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("n", [0, 1, 9, N])
def test_backends_match_reference(ckpt, engines, n, where):
    config, tensors, _ = ckpt
    what = f"n={n} {where}"
    rng = np.random.default_rng(n + 31 * len(where))
    vm = layout(n, where)
    emb = vision_inputs(tensors, rng.integers(3, config.vocab_size, len(vm)), vm, seed=n)
    vm2 = layout(min(n, 6), "middle", text=4)  # a second chunk on top of the caches
    emb2 = vision_inputs(tensors, rng.integers(3, config.vocab_size, len(vm2)), vm2, seed=100 + n)

    ref = Reference(config, tensors)
    r_logits = [ref.prefill(embeds=emb, vision_mask=vm)[-1]]
    check_route_margins(ref, vm, what)
    ref_kv = [ref.kv_lengths()]
    tokens = [int(np.argmax(r_logits[0]))]
    for _ in range(3):
        check_argmax_margin(r_logits[-1], what)
        r_logits.append(ref.decode(tokens[-1]))
        tokens.append(int(np.argmax(r_logits[-1])))
    r_logits.append(ref.prefill(embeds=emb2, vision_mask=vm2)[-1])
    check_route_margins(ref, vm2, what + " chunk 2")
    ref_kv.append(ref.kv_lengths())

    got = {}
    for b, e in engines.items():
        e.reset()
        out = [e.prefill(inputs_embeds=emb, vision_mask=vm)]
        assert e.kv_lengths() == ref_kv[0], (b, what)
        toks = [int(np.argmax(out[0]))]
        for _ in range(3):
            out.append(e.decode(toks[-1]))
            toks.append(int(np.argmax(out[-1])))
        out.append(e.prefill(inputs_embeds=emb2, vision_mask=vm2))
        assert e.kv_lengths() == ref_kv[1], (b, what)
        assert e.position == ref.position
        assert toks == tokens, (b, what)
        err = max(float(np.abs(g - r).max()) for g, r in zip(out, r_logits))
        assert err <= TOL, f"{b} {what}: logits max err {err:.3g} vs the float64 reference"
        got[b] = out
    for a in got:
        for b in got:
            if a < b:
                err = max(float(np.abs(x - y).max()) for x, y in zip(got[a], got[b]))
                assert err <= TOL, f"{a} vs {b} {what}: {err:.3g}"


def test_torch_without_a_limit(ckpt):
    """max_vision_tokens=None takes a chunk over N (one TopK stage per MoD layer eagerly) and answers as the reference."""
    config, tensors, path = ckpt
    e, ref = pmod.open_engine(path, backend="torch"), Reference(config, tensors)
    vm = layout(N + 5, "middle")
    emb = vision_inputs(tensors, np.arange(3, 3 + len(vm)), vm, seed=7)
    assert np.abs(e.prefill(inputs_embeds=emb, vision_mask=vm) - ref.prefill(embeds=emb, vision_mask=vm)[-1]).max() <= TOL
    assert e.kv_lengths() == ref.kv_lengths()


def test_dense_twin_and_kept_positions(ckpt, exported, engines):
    """dense=True (routers unused) and the positions each layer holds agree across backends."""
    config, tensors, path = ckpt
    vm = layout(12, "middle")
    emb = vision_inputs(tensors, np.arange(3, 3 + len(vm)), vm, seed=11)
    held = {}
    for b, e in engines.items():
        e.reset()
        e.prefill(inputs_embeds=emb, vision_mask=vm)
        held[b] = [np.sort(p).tolist() for p in e.kept_positions()]
    assert all(h == held["torch"] for h in held.values())
    assert [len(h) for h in held["torch"]] == [10 + k for k in capacities(config, 12)]
    ref = Reference(config, tensors)
    want = ref.prefill(embeds=emb)[-1]  # no vision mask: every layer runs every token
    dense = [pmod.open_engine(path, backend="torch", dense=True), pmod.open_engine(exported, backend="onnx", dense=True)]
    if HAS_MLX:
        dense.append(pmod.open_engine(path, backend="mlx", dtype="float32", dense=True))
    for e in dense:
        assert np.abs(e.prefill(inputs_embeds=emb, vision_mask=vm) - want).max() <= TOL
        assert e.kv_lengths() == [len(vm)] * config.num_hidden_layers


def test_default_max_vision_tokens():
    """N defaults to the routed tokens of the largest single image (pmod.image's plan and mask)."""
    from official_checkpoint import tiny_official_config

    clip = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                image_size=336, patch_size=14)
    nxt = tiny_official_config(vision_config=clip)  # LLaVA-NeXT pinpoints, anyres, vision_hr
    assert one_image_vision_tokens(nxt) == 48 * 49  # 2x2 grid: 48 rows of 48 + newline
    assert one_image_vision_tokens(
        tiny_official_config(vision_config=clip, mod_target_token_type="vision")) == 48 * 49 + 576
    flat = tiny_official_config(vision_config=clip, image_aspect_ratio="pad", mm_patch_merge_type="flat",
                                image_grid_pinpoints=None)
    assert one_image_vision_tokens(flat) == 576
    assert one_image_vision_tokens(tiny_config()) == 0
    assert one_image_vision_tokens(tiny_config(**NEXT)) == N


def test_images_and_session_agree(ckpt, exported, engines, tmp_path, capsys):
    from PIL import Image

    config, _, path = ckpt
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(img)
    image = preprocess(img, config)
    assert image.grid is not None and 0 < image.routed_mask(config.mod_target_token_type).sum() <= N
    feats = {b: e.encode_image(image) for b, e in engines.items()}
    for b, f in feats.items():
        assert f.shape == (image.num_tokens, config.hidden_size)
        assert np.abs(f - feats["torch"]).max() <= TOL, b

    replies = {}
    for b, e in engines.items():
        e.reset()
        reply = Reply()
        session = Session(e, exported if b == "onnx" else path)
        text = "".join(session.ask("what colour is the circle ?", images=[img], max_tokens=8, reply=reply))
        replies[b] = (text, reply.stats.generated_tokens, e.kv_lengths())
    assert len(set(map(str, replies.values()))) == 1, replies

    # the CLI through the shared session, ONNX Runtime on the export directory
    assert main(["generate", "--model", str(exported), "--backend", "onnx", "--prompt",
                 "what colour is the circle ?", "--image", str(img), "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == replies["torch"][0].strip()


def test_topk_stages_and_ties(tmp_path):
    """A selection in stages (constant K, or K from a carrier's length) takes the same set in the same
    order as one stable sort; ties keep the lower index, in the graph as eagerly."""
    import onnxruntime as ort

    class Select(torch.nn.Module):
        def forward(self, key, keep_a, keep_b):
            return static_decoder.select_top(key, [keep_a, 3, keep_b])

    pad = static_decoder.PAD_SCORE
    keys = [torch.tensor([[0.5, 1.0, 0.5, 2.0, 1.0, 1.0, pad, 0.5, 3.0, 1.0]]),
            torch.tensor([[pad, 0.3, pad, pad, -2.0, pad, pad, pad, pad, pad]])]  # stages run into padding
    carriers = (torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
    expected = [sorted(range(10), key=lambda i: (-float(k[0, i]), i))[:7] for k in keys]
    assert [Select()(k, *carriers)[0].tolist() for k in keys] == expected
    f = tmp_path / "select.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(Select(), (keys[0], *carriers), str(f), dynamo=False, opset_version=17,
                          input_names=["key", "a", "b"], output_names=["idx"],
                          dynamic_axes={"key": {1: "n"}, "a": {0: "ka"}, "b": {0: "kb"}})
    model = onnx.load(str(f))
    onnx_export.narrow_index_casts(model)
    assert sorted(n.op_type for n in model.graph.node).count("TopK") == 3
    onnx.save(model, str(f))
    assert lint_path(f) == []
    sess = ort.InferenceSession(str(f))
    for k, want in zip(keys, expected):
        got = sess.run(None, {"key": k.numpy(), "a": np.zeros(2, bool), "b": np.zeros(2, bool)})[0]
        assert got.dtype == np.int32 and got[0].tolist() == want
    got = sess.run(None, {"key": keys[0].numpy(), "a": np.zeros(1, bool), "b": np.zeros(0, bool)})[0]
    assert got[0].tolist() == expected[0][:4]  # carrier lengths are the stages' K


def test_exported_graphs_pass_checks(ckpt, exported):
    config = ckpt[0]
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["capacities"] == capacities(config, N) == [20, 20, 13, 6, 3, 3]
    assert set(manifest["graphs"]) == {"embed", "vision", "prefill", "decode"}
    assert manifest["max_vision_tokens"] == N and manifest["max_context"] == 256 and manifest["target"] == "ort"
    assert manifest["config"]["mod_target_layers"] == config.mod_target_layers
    prefill = onnx.load(str(exported / "prefill.onnx"))
    onnx.checker.check_model(prefill, full_check=True)
    routing = [n for n in prefill.graph.node if n.op_type == "TopK" and all(a.name != "largest" or a.i for a in n.attribute)]
    assert len(routing) == 4  # one per MoD layer (the others sort a layer's slots by position)
    ops = [n.op_type for n in prefill.graph.node]
    assert ops.count("ScatterND") == 4 and "ScatterElements" not in ops  # kept rows back, row-wise
    for side in ("inputs", "outputs"):
        for t in manifest["graphs"]["prefill"][side]:
            assert t["dtype"] != "int64", t
    out = {t["name"]: t["shape"] for t in manifest["graphs"]["prefill"]["outputs"]}
    assert out["logits"] == [1, config.vocab_size] and out["new_key_2"] == [1, "text_len+keep_2_0", 2, 8]
    with pytest.raises(PmodError, match="exported for ONNX Runtime"):
        lint_path(exported)  # the ort target uses contrib attention: not a TensorRT graph


def test_float16_external_data_and_limits(ckpt, exported, monkeypatch, capsys):
    """CLI export in float16 with weights in external data; context, N and dtype limits."""
    config, tensors, path = ckpt
    out = path.parent / "onnx16"
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    assert main(["export", "onnx", "--model", str(path), "--out", str(out), "--max-vision-tokens", "6",
                 "--dtype", "float16", "--max-context", "48"]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    for g in manifest["graphs"].values():
        assert g["external_data"] == g["file"] + ".data" and (out / g["external_data"]).is_file()
    assert (out / "tokenizer.json").is_file()
    e16 = pmod.open_engine(out, backend="onnx")
    e32 = pmod.open_engine(exported, backend="onnx")
    vm = layout(6, "middle")
    emb = vision_inputs(tensors, np.arange(3, 3 + len(vm)), vm, seed=5)
    a, b = e16.prefill(inputs_embeds=emb, vision_mask=vm), e32.prefill(inputs_embeds=emb, vision_mask=vm)
    assert np.abs(a - b).max() < 0.05 and e16.kv_lengths() == e32.kv_lengths()
    assert e16.config.max_position_embeddings == 48

    vm7 = np.r_[np.ones(7, bool), False]
    with pytest.raises(PmodError, match="7 routed vision tokens .* at most 6: re-export with --max-vision-tokens 7"):
        e16.prefill(inputs_embeds=vision_inputs(tensors, np.arange(8), vm7), vision_mask=vm7)
    e16.reset()
    with pytest.raises(PmodError, match="exceed the exported context of 48.*--max-context"):
        e16.prefill(input_ids=np.arange(49) % 90 + 3)
    e16.prefill(input_ids=np.arange(40) % 90 + 3)
    with pytest.raises(PmodError, match="exceed the exported context"):
        e16.prefill(input_ids=np.arange(9) % 90 + 3)
    assert e16.position == 40  # a refused chunk changes nothing
    with pytest.raises(PmodError, match="holds float16 graphs; for float32 re-export with 'pmod export onnx --dtype float32'"):
        pmod.open_engine(out, backend="onnx", dtype="float32")


def test_torch_engine_limits(ckpt, engines):
    config, tensors, _ = ckpt
    e = engines["torch"]
    e.reset()
    vm = np.ones(N + 1, dtype=bool)
    with pytest.raises(PmodError, match=f"{N + 1} routed vision tokens .* at most {N}.*max_vision_tokens"):
        e.prefill(inputs_embeds=vision_inputs(tensors, np.arange(N + 1), vm), vision_mask=vm)
    with pytest.raises(PmodError, match="token ids must be in"):
        e.prefill(input_ids=[config.vocab_size])
    assert e.position == 0 and e.kv_lengths() == [0] * config.num_hidden_layers


# ----------------------------------------------------------------------------- bad input
def test_bad_export_directories(ckpt, exported, tmp_path):
    d = copy_dir(exported, tmp_path, "missing")
    (d / "decode.onnx").unlink()
    with pytest.raises(PmodError, match="decode.onnx is missing .*re-export"):
        pmod.open_engine(d, backend="onnx")

    d = copy_dir(exported, tmp_path, "renamed")
    edit_manifest(d, lambda m: m["graphs"]["prefill"]["inputs"][0].update(name="embeds"))
    with pytest.raises(PmodError, match="does not match prefill.onnx: inputs differ"):
        pmod.open_engine(d, backend="onnx")

    d = copy_dir(exported, tmp_path, "dtype")
    edit_manifest(d, lambda m: m["graphs"]["decode"]["inputs"][1].update(dtype="int64"))
    with pytest.raises(PmodError, match="input 'text_positions' is int32 .* int64"):
        pmod.open_engine(d, backend="onnx")

    d = copy_dir(exported, tmp_path, "swapped")
    shutil.copy(d / "decode.onnx", d / "prefill.onnx")
    with pytest.raises(PmodError, match="does not match prefill.onnx"):
        pmod.open_engine(d, backend="onnx")

    d = copy_dir(exported, tmp_path, "caps")
    edit_manifest(d, lambda m: m.update(capacities=[20, 20, 14, 6, 3, 3]))
    with pytest.raises(PmodError, match="do not match the schedule"):
        pmod.open_engine(d, backend="onnx")

    d = copy_dir(exported, tmp_path, "json")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(PmodError, match="not valid JSON"):
        pmod.open_engine(d, backend="onnx")

    with pytest.raises(PmodError, match="no manifest.json.*pmod checkpoint"):
        pmod.open_engine(ckpt[2], backend="onnx")


def test_export_errors_leave_nothing(ckpt, tmp_path, monkeypatch):
    path = ckpt[2]
    with pytest.raises(PmodError, match="already exists"):
        export_onnx(path, path, 4)
    with pytest.raises(PmodError, match="exceeds the context"):
        export_onnx(path, tmp_path / "a", 300)
    with pytest.raises(PmodError, match="--max-context must be in 1..256"):
        export_onnx(path, tmp_path / "a", 4, max_context=512)
    with pytest.raises(PmodError, match="--dtype 'bfloat16' is not supported"):
        export_onnx(path, tmp_path / "a", 4, dtype="bfloat16")
    with pytest.raises(PmodError, match="--max-vision-tokens must be a non-negative"):
        export_onnx(path, tmp_path / "a", -1)
    with pytest.raises(PmodError, match="--target 'tensorrt' is not supported: choose one of ort, trt"):
        export_onnx(path, tmp_path / "a", 4, target="tensorrt")
    with pytest.raises(PmodError, match="^buckets must be strictly increasing"):
        export_onnx(path, tmp_path / "a", buckets=[4, 4])
    finding = "graph.onnx: n (TopK): topk: K is not a constant"
    monkeypatch.setattr(onnx_export, "_check_all", lambda directory, graphs, lint: [finding])
    with pytest.raises(PmodError, match="fail the TensorRT-compatibility lint"):
        export_onnx(path, tmp_path / "a", 4, max_context=32)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory


def test_text_only_model(tmp_path):
    """A checkpoint without vision exports embed + decode (N = 0) and runs like the reference."""
    config = tiny_config(max_position_embeddings=64)
    tensors = random_tensors(config, seed=4)
    path = save_checkpoint(tmp_path / "text", config, tensors, dtype="float16")
    with pytest.raises(PmodError, match="text-only model.*--max-vision-tokens 0"):
        export_onnx(path, tmp_path / "bad", 8)
    out = export_onnx(path, tmp_path / "onnx", 0)
    assert sorted(json.loads((out / "manifest.json").read_text())["graphs"]) == ["decode", "embed"]
    e = pmod.open_engine(out, backend="onnx")
    ref = Reference(config, {k: v.astype(np.float16).astype(np.float32) for k, v in tensors.items()})
    ids = np.arange(3, 15)
    assert np.abs(e.prefill(input_ids=ids) - ref.prefill(ids=ids)[-1]).max() <= TOL
    assert np.abs(e.decode(5) - ref.decode(5)).max() <= TOL
    with pytest.raises(PmodError, match="at most 0: re-export with --max-vision-tokens 2"):
        e.prefill(inputs_embeds=np.zeros((3, config.hidden_size)), vision_mask=[True, False, True])


def test_converted_llava_hf_next_end_to_end(tmp_path):
    """llava-hf NeXT -> pmod convert -> pmod export onnx (default N): the three backends answer alike."""
    from hf_llava import make_hf_llava
    from PIL import Image

    from pmod.convert import convert_checkpoint

    ckpt = convert_checkpoint(make_hf_llava(tmp_path / "src", "next", seed=3), tmp_path / "pmod", dtype="float32")
    out = export_onnx(ckpt, tmp_path / "onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    config = pmod.PmodConfig.from_file(ckpt)
    assert manifest["max_vision_tokens"] == one_image_vision_tokens(config) > 0
    assert (out / "preprocessor_config.json").is_file()
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(img)
    replies = {}
    for b, path in [("torch", ckpt), ("onnx", out)] + ([("mlx", ckpt)] if HAS_MLX else []):
        session = open_session(path, backend=b, dtype="float32")
        reply = Reply()
        text = "".join(session.ask("describe this image", images=[img], max_tokens=6, reply=reply))
        replies[b] = (text, reply.stats.prompt_tokens, session.engine.kv_lengths())
    assert len(set(map(str, replies.values()))) == 1, replies
