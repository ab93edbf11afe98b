"""4- and 8-bit quantized checkpoints (``pmod convert --quantize``): exactly MLX's
``mx.quantize``, what stays float, validation of a corrupted checkpoint, MLX loading and
generation, the backends that refuse them, ``--dequantize``, and LoRA (QLoRA) on a
quantized base through training and ``pmod fuse``.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from builders import random_tensors, write_checkpoint
from lora_fixtures import make_model, vision_config, write_shapes_jsonl
from tiny_tokenizer import write_tiny_tokenizer

pytest.importorskip("pmod_mlx")  # its fast BLAS loads before mlx.core

import mlx.core as mx  # noqa: E402

import pmod  # noqa: E402
from pmod.app.cli import main  # noqa: E402
from pmod.convert import convert_checkpoint  # noqa: E402
from pmod.errors import PmodError  # noqa: E402
from pmod.format import load_numpy, validate  # noqa: E402
from pmod.quantization import linear_shapes, need_ops  # noqa: E402
from pmod_mlx import quantize as mlx_quant  # noqa: E402
from pmod.safetensors_io import read_header, read_tensors, to_float32, write_file  # noqa: E402

PROMPT = np.array([1, 5, 9, 17, 33, 40, 41, 60, 72, 3], np.int32)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A float16 tiny VLM (tower, projector; hidden 32, MLP 64) and its 4- and 8-bit copies."""
    root = tmp_path_factory.mktemp("quantize")
    config = vision_config()
    path = write_checkpoint(root, config, random_tensors(config, seed=2), dtype="float16", name="float")
    write_tiny_tokenizer(path, config.vocab_size)
    q8 = convert_checkpoint(path, root / "q8", quantize=8, group_size=32, quant_ops=mlx_quant)
    q4 = convert_checkpoint(path, root / "q4", quantize=4, group_size=32, quant_ops=mlx_quant)
    return path, q8, q4


def _tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    _, found = validate(path)
    out = {}
    for f in {f for f, _ in found.values()}:
        header = read_header(f)
        out.update({n: (header[n]["dtype"], np.array(a)) for n, a in read_tensors(f).items()})
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pmod: error:"), err
    return err[0]


# ----------------------------------------------------------------------------- the checkpoint
def test_stored_tensors_are_mx_quantize(vlm):
    path, q8, q4 = vlm
    base = _tensors(path)
    for q, bits in ((q8, 8), (q4, 4)):
        config, found = validate(q)
        assert config.quant.bits == bits and config.quant.group_size == 32
        assert set(config.quant.modules) == set(linear_shapes(config))  # 32 divides every input here
        stored = _tensors(q)
        for m in config.quant.modules:
            w = mx.array(base[m + ".weight"][1])  # the float16 weight as the float checkpoint holds it
            want = mx.quantize(w, group_size=32, bits=bits)
            assert stored[m + ".weight"][0] == "U32" and stored[m + ".scales"][0] == "F16"
            for part, a in zip(("weight", "scales", "biases"), want):
                assert np.array_equal(stored[f"{m}.{part}"][1], np.array(a)), (m, part)
        # Everything else (routers, norms, embeddings, biases, the tower) is the float tensor, bit for bit.
        floats = [n for n in base if n not in {m + ".weight" for m in config.quant.modules}]
        assert any(".router." in n for n in floats) and any(n.startswith("vision_tower.") for n in floats)
        for n in floats:
            assert stored[n][0] == base[n][0] and np.array_equal(stored[n][1], base[n][1]), n
        assert json.loads((q / "config.json").read_text())["quantization"]["bits"] == bits
        assert (q / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()


def test_group_size_that_does_not_divide_keeps_a_linear_float(vlm, tmp_path, capsys):
    path, _, _ = vlm
    q = convert_checkpoint(path, tmp_path / "g64", quantize=4, quant_ops=mlx_quant)  # default group size 64
    config, found = validate(q)
    # hidden 32 is not a multiple of 64: only the MLPs' down_proj (input 64) is quantized.
    assert config.quant.group_size == 64
    assert sorted(config.quant.modules) == [f"language_model.layers.{i}.mlp.down_proj" for i in range(6)]
    assert found["language_model.layers.0.self_attn.q_proj.weight"][1] == "F16"
    assert found["projector.linear_1.weight"][1] == "F16" and found["language_model.lm_head.weight"][1] == "F16"
    assert main(["info", str(q)]) == 0
    out = capsys.readouterr().out
    assert "quantization: 4-bit affine (MLX), group size 64: 6 of 45 linears quantized" in out
    assert "quantized: language_model.layers.N.mlp.down_proj (N = 0..5)" in out
    assert "float (input size not a multiple of 64): language_model.layers.N.self_attn.q_proj (N = 0..5)" in out
    assert "float (input size not a multiple of 64): projector.linear_1" in out
    assert "float always: routers, norms, embeddings, vision tower" in out


def test_official_source_converts_quantized(tmp_path):
    pytest.importorskip("torch")  # the official checkpoint is written with torch
    from official_checkpoint import make_official_checkpoint, random_pmod_tensors, tiny_official_config

    config = tiny_official_config()
    src = make_official_checkpoint(tmp_path / "official", config, random_pmod_tensors(config), dtype="bfloat16",
                                   layout="safetensors", vision_tower=False)
    assert main(["convert", str(src), str(tmp_path / "float")]) == 0
    assert main(["convert", str(src), str(tmp_path / "q8"), "--quantize", "8", "--group-size", "32"]) == 0
    assert main(["convert", str(tmp_path / "float"), str(tmp_path / "q8b"), "--quantize", "8",
                 "--group-size", "32"]) == 0
    direct, via_float = _tensors(tmp_path / "q8"), _tensors(tmp_path / "q8b")
    assert direct.keys() == via_float.keys()
    assert all(direct[n][0] == via_float[n][0] and np.array_equal(direct[n][1], via_float[n][1]) for n in direct)
    qc, found = validate(tmp_path / "q8")
    assert "projector.linear_1" not in qc.quant.modules  # mm_hidden_size 24: not a multiple of 32
    assert found["projector.linear_2.scales"][1] == "BF16"


# ----------------------------------------------------------------------------- running it
def test_quantized_model_runs_close_to_float(vlm, capsys):
    path, q8, q4 = vlm
    ref = pmod.open_engine(path, dtype="float32").prefill(input_ids=PROMPT)
    scale = np.abs(ref).max()
    err = {}
    for q, bits in ((q8, 8), (q4, 4)):
        e = pmod.open_engine(q, dtype="float32")
        err[bits] = np.abs(e.prefill(input_ids=PROMPT) - ref).max() / scale
    # A text prompt (routing is discrete; the logits are not). Measured, max |logit error| /
    # max |logit| against the float model: 8-bit 0.0093, 4-bit 0.146 (group size 32, seed 2).
    assert err[8] <= 0.02, err
    assert err[4] <= 0.3, err
    assert err[8] < err[4] / 4, err
    for q in (q8, q4):  # float16 compute: scales and biases cast, packed weights as stored
        assert main(["generate", "--model", str(q), "--prompt", "what colour is the circle?", "--max-tokens", "4",
                     "--dtype", "float16"]) == 0
    capsys.readouterr()


def test_other_backends_refuse_and_dequantize(vlm, tmp_path, capsys):
    path, q8, _ = vlm
    with pytest.raises(PmodError, match="only the MLX backend runs.*--dequantize"):
        load_numpy(q8)
    loader = pytest.importorskip("pmod_export.torch_loader")
    if not loader.clash():
        from pmod_export.onnx_export import export_onnx

        for call in (lambda: pmod.open_engine(q8, backend="torch"), lambda: export_onnx(q8, tmp_path / "o")):
            with pytest.raises(PmodError, match="8-bit quantized checkpoint, which only the MLX backend runs") as e:
                call()
            assert "\n" not in str(e.value)
    assert main(["convert", str(q8), str(tmp_path / "deq"), "--dequantize"]) == 0
    config, found = validate(tmp_path / "deq")
    assert config.quant is None and {st for _, st in found.values()} == {"F16"}
    q = _tensors(q8)
    m = "language_model.layers.3.mlp.up_proj"  # dequantized in float32, then stored in the checkpoint's float16
    scales, biases = (mx.array(q[f"{m}.{p}"][1]).astype(mx.float32) for p in ("scales", "biases"))
    want = mx.dequantize(mx.array(q[m + ".weight"][1]), scales, biases, group_size=32, bits=8)
    got = to_float32(read_tensors(found[m + ".weight"][0], [m + ".weight"])[m + ".weight"], "F16")
    assert np.array_equal(got, np.array(want.astype(mx.float16).astype(mx.float32)))
    assert "quantization" not in json.loads((tmp_path / "deq" / "config.json").read_text())


# ----------------------------------------------------------------------------- broken checkpoints
def _rewrite(q, tmp_path, name, tensors=None, config=None):
    """A copy of the quantized checkpoint ``q`` with its tensors or config.json edited."""
    import shutil

    dst = tmp_path / name
    shutil.copytree(q, dst)
    if tensors is not None:
        stored = _tensors(q)
        tensors(stored)
        write_file(dst / "model.safetensors", stored)
    if config is not None:
        d = json.loads((q / "config.json").read_text())
        config(d)
        (dst / "config.json").write_text(json.dumps(d))
    return dst


def test_corrupted_quantized_checkpoints_are_one_line(vlm, tmp_path, capsys):
    _, q8, _ = vlm
    m = "language_model.layers.2.mlp.gate_proj"

    def narrower_scales(t):
        st, a = t[m + ".scales"]
        t[m + ".scales"] = (st, a[:-1])

    def float_weight(t):
        t[m + ".weight"] = ("F32", t[m + ".weight"][1].astype(np.float32))

    def no_biases(t):
        del t[m + ".biases"]

    def set_q(key, value):
        return lambda d: d["quantization"].__setitem__(key, value)

    cases = [
        (dict(tensors=narrower_scales), f"tensor '{m}.scales'.*has shape \\(63, 1\\), expected \\(64, 1\\)"),
        (dict(tensors=float_weight), f"tensor '{m}.weight'.*dtype F32; expected U32"),
        (dict(tensors=no_biases), f"tensor '{m}.biases'.*is missing"),
        (dict(config=set_q("bits", 3)), "'quantization' has bits 3; expected 4 or 8"),
        (dict(config=set_q("group_size", 48)), "'quantization' has group_size 48"),
        (dict(config=set_q("modules", "all")), "'modules' as a list"),
        (dict(config=set_q("modules", ["language_model.layers.2.router"])),
         "lists 'language_model.layers.2.router', which is not a linear pmod quantizes"),
        (dict(config=lambda d: d.__setitem__("quantization", {"bits": 8})), "must be \\{\"bits\""),
        (dict(config=set_q("modules", [m])), r"has shape \(97, 8\), expected \(97, 32\) from config.json"),  # lm_head
    ]
    for i, (edit, message) in enumerate(cases):
        bad = _rewrite(q8, tmp_path, f"bad{i}", **edit)
        with pytest.raises(PmodError, match=message):
            validate(bad)
        assert main(["generate", "--model", str(bad), "--prompt", "hi", "--max-tokens", "1"]) == 2
        _error_line(capsys)
    # A truncated file: the last tensors end past the end of the data.
    bad = _rewrite(q8, tmp_path, "truncated")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert main(["info", str(bad)]) == 0  # info reads config.json only
    with pytest.raises(PmodError, match="truncated file"):
        validate(bad)
    # group size 64 with hidden 32: a listed q_proj cannot be quantized.
    bad = _rewrite(q8, tmp_path, "ragged", config=set_q("group_size", 64))
    with pytest.raises(PmodError, match="input size 32 is not a multiple of the group size 64"):
        validate(bad)


def test_bad_quantize_flags_are_one_line(vlm, tmp_path, capsys):
    path, q8, _ = vlm
    for args, message in [
        (["--quantize", "3"], "argument --quantize: invalid choice: 3"),
        (["--quantize", "x"], "argument --quantize: invalid int value"),
        (["--quantize", "4", "--group-size", "48"], "argument --group-size: invalid choice: 48"),
        (["--group-size", "64"], "--group-size goes with --quantize"),
        (["--quantize", "4", "--dequantize"], "exclude each other"),
        ([], "already a pmod checkpoint: use it directly.*--quantize"),
    ]:
        assert main(["convert", str(path), str(tmp_path / "out")] + args) == 2
        assert re.search(message, _error_line(capsys)), message
    assert main(["convert", str(q8), str(tmp_path / "out"), "--quantize", "4"]) == 2
    assert "already quantized (8-bit)" in _error_line(capsys)
    assert main(["convert", str(path), str(tmp_path / "out"), "--dequantize"]) == 2
    assert "is not quantized" in _error_line(capsys)
    assert not (tmp_path / "out").exists()
    with pytest.raises(PmodError, match="^quantize must be 4 or 8"):
        convert_checkpoint(path, tmp_path / "out", quantize=2, quant_ops=mlx_quant)
    with pytest.raises(PmodError, match="^group_size must be 32, 64 or 128"):
        convert_checkpoint(path, tmp_path / "out", quantize=4, group_size=16, quant_ops=mlx_quant)


def test_missing_mlx_is_one_line(monkeypatch):
    from pmod.app.registry import tool

    monkeypatch.setitem(sys.modules, "mlx", None)  # MLX not installed: pmod_mlx.quantize cannot import
    monkeypatch.delitem(sys.modules, "pmod_mlx.quantize")
    with pytest.raises(PmodError, match=r"pmod convert --quantize needs the mlx extra .*pip install 'pmod\[mlx\]'"):
        tool("quantization", "pmod convert --quantize")
    with pytest.raises(PmodError, match=r"needs MLX's quantization arithmetic"):
        need_ops(None, "pmod convert --quantize")


# ----------------------------------------------------------------------------- QLoRA
def test_lora_on_a_quantized_base_trains_and_fuses(tmp_path, capsys):
    from pmod_mlx.loader import load
    from pmod_mlx.lora.trainer import Trainer
    from pmod.lora_data import TrainArgs

    path = make_model(tmp_path, vision_config())
    q = convert_checkpoint(path, tmp_path / "q8", quantize=8, group_size=32, quant_ops=mlx_quant)
    data = write_shapes_jsonl(tmp_path / "data", n=16, text_rows=2)
    out = tmp_path / "adapter"
    args = TrainArgs(model=str(q), data=str(data), adapter_path=str(out), iters=6, batch_size=4, warmup=1,
                     learning_rate=1e-2, save_every=6, steps_per_eval=6, val_batches=1, steps_per_report=6,
                     dropout=0.0, seed=1, target_modules="q,v,down,lm_head", dtype="float32")
    result = Trainer(args, log=lambda m: None, progress=False).train()
    val = [h["val_loss"] for h in result["history"] if "val_loss" in h]
    assert val[-1] < val[0], val  # it trains on the frozen quantized base
    with pytest.raises(PmodError, match="projector is quantized"):
        Trainer(TrainArgs(**{**args.__dict__, "adapter_path": str(tmp_path / "x"), "train_projector": True}),
                log=lambda m: None, progress=False)

    assert main(["fuse", "--model", str(q), "--adapter-path", str(out), "--out", str(tmp_path / "fused")]) == 0
    config, found = validate(tmp_path / "fused")
    assert config.quant == validate(q)[0].quant  # still quantized, same settings
    before, after = _tensors(q), _tensors(tmp_path / "fused")
    m = "language_model.layers.5.self_attn.q_proj"
    assert not np.array_equal(before[m + ".weight"][1], after[m + ".weight"][1])  # re-quantized merge
    assert np.array_equal(before["language_model.layers.5.self_attn.k_proj.weight"][1],
                          after["language_model.layers.5.self_attn.k_proj.weight"][1])  # not adapted
    ids = mx.array(PROMPT)[None]
    fused = load(tmp_path / "fused", "float32").language_model(ids)
    applied = load(q, "float32", adapter_path=out).language_model(ids)
    assert np.array_equal(np.array(fused), np.array(applied))  # --adapter-path merges exactly as fuse does
