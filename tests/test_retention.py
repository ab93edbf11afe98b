"""The retention dial (``--retention S``): the scaled ratios computed in one place
(``pmod.schedule.layer_ratios``), and every runtime (MLX, torch, an ONNX export), the FLOP
counts, the commands and the sweep script using them.

The tiny model's trained ratios are ``[-, -, 0.6545, 0.3455, 0.15, 0.15]`` (min ratio
0.15). The settings checked: 0.5 (scaled, two layers clamped at the minimum), 1.6 (layer 2
clamped at 1), 10 (every MoD layer at 1) and 0.01 (every MoD layer at the minimum).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from builders import random_tensors, tiny_config, vision_inputs, write_checkpoint
from tiny_tokenizer import write_tiny_tokenizer

import pmod
from pmod.app.cli import main
from pmod.errors import PmodError
from pmod.flops import prefill_flops, report
from pmod.schedule import capacities, kept_count, layer_ratios

SETTINGS = (0.5, 1.6, 10.0, 0.01)
N_TEXT, N_VISION = 10, 30


def expected_ratios(config, s: float, low: float = 0.15) -> list:
    """``clamp(s * r_l, min, 1)`` from the trained ratios, written out here."""
    return [None if r is None else min(1.0, max(low, s * r)) for r in layer_ratios(config)]


def expected_kv(config, s: float) -> list[int]:
    """Text tokens plus ``trunc(float32(n) * float32(ratio))`` kept vision tokens per layer."""
    return [N_TEXT + (N_VISION if r is None else int(np.trunc(np.float32(N_VISION) * np.float32(r))))
            for r in expected_ratios(config, s)]


def prompt(tensors):
    vm = np.zeros(N_TEXT + N_VISION, bool)
    vm[4:4 + N_VISION] = True
    return vision_inputs(tensors, np.arange(3, 3 + len(vm)), vm, seed=5), vm


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = tiny_config(mm_projector_type="mlp2x_gelu", mm_hidden_size=32)  # a projector: exports take vision
    tensors = random_tensors(config, seed=4)
    path = write_checkpoint(tmp_path_factory.mktemp("retention"), config, tensors)
    write_tiny_tokenizer(path, config.vocab_size)
    return config, tensors, path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pmod: error:"), err
    return err[0]


# ----------------------------------------------------------------------------- schedule
def test_ratios_scale_clamp_and_keep_dense_layers():
    config = tiny_config()
    trained = layer_ratios(config)
    assert layer_ratios(config, 1.0) == trained and layer_ratios(config, 1) == trained
    for s in SETTINGS:
        assert layer_ratios(config, s) == expected_ratios(config, s)
        assert capacities(config, 2365, s) == [kept_count(2365, r) for r in expected_ratios(config, s)]
    assert layer_ratios(config, 10.0)[2:] == [1.0] * 4 and layer_ratios(config, 0.01)[2:] == [0.15] * 4
    assert layer_ratios(config, 1.6)[2] == 1.0 and 0.15 < layer_ratios(config, 1.6)[3] < 1.0
    # Constant schedules have no minimum; a dense model stays dense at any setting.
    const = tiny_config(mod_target_layers="deep_all", mod_router_factor=0.5)
    assert layer_ratios(const, 0.5) == [None, None, 0.25, 0.25, 0.25, None]
    assert layer_ratios(const, 3.0) == [None, None, 1.0, 1.0, 1.0, None]
    assert layer_ratios(tiny_config(mod_target_layers=None), 0.3) == [None] * 6


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, float("nan"), float("inf"), "0.5", True, None])
def test_bad_retention_is_one_line(bad):
    with pytest.raises(PmodError, match=r"^retention must be a number > 0") as e:
        layer_ratios(tiny_config(), bad)
    assert "\n" not in str(e.value) and e.value.worded().startswith("--retention must be a number > 0")


def test_bad_retention_flags(capsys):
    for value in ("0", "-1", "abc", "nan"):
        for cmd in (["generate", "--prompt", "hi"], ["chat"], ["server"], ["demo"],
                    ["flops", "--preset", "llava-1.5-7b"], ["export", "onnx", "--out", "x"]):
            assert main(cmd + [f"--retention={value}"]) == 2
            line = _error_line(capsys)
            assert "--retention" in line and "must be a number > 0" in line, line


def assert_default_is_one(path, emb, vm, **engine_args):
    """Retention left out and retention 1.0 give the same logits and kept positions."""
    default = pmod.open_engine(path, **engine_args)
    one = pmod.open_engine(path, retention=1.0, **engine_args)
    assert np.array_equal(default.prefill(inputs_embeds=emb, vision_mask=vm),
                          one.prefill(inputs_embeds=emb, vision_mask=vm))
    assert all(np.array_equal(a, b) for a, b in zip(default.kept_positions(), one.kept_positions()))


# ----------------------------------------------------------------------------- MLX
def test_mlx_dial(model):
    pytest.importorskip("pmod_mlx")
    config, tensors, path = model
    emb, vm = prompt(tensors)
    assert_default_is_one(path, emb, vm, dtype="float32")
    vision = set(np.flatnonzero(vm).tolist())
    for s in SETTINGS:
        e = pmod.open_engine(path, dtype="float32", retention=s)
        assert e.retention == s
        got = e.prefill(inputs_embeds=emb, vision_mask=vm)
        assert e.kv_lengths() == expected_kv(config, s), s
        if s == 10.0:  # every vision token kept, yet w still scales them: not the dense twin
            assert all(vision <= set(p.tolist()) for p in e.kept_positions())
            dense = pmod.open_engine(path, dtype="float32", dense=True)
            assert np.abs(got - dense.prefill(inputs_embeds=emb, vision_mask=vm)).max() > 1e-3


# ----------------------------------------------------------------------------- torch and ONNX
def _torch():
    loader = pytest.importorskip("pmod_export.torch_loader")
    if loader.clash():
        pytest.skip(loader.clash())


def test_torch_dial_matches_mlx(model):
    _torch()
    config, tensors, path = model
    emb, vm = prompt(tensors)
    assert_default_is_one(path, emb, vm, backend="torch")
    pytest.importorskip("pmod_mlx")
    for s in SETTINGS:
        e = pmod.open_engine(path, backend="torch", retention=s, max_vision_tokens=N_VISION + 4)
        got = e.prefill(inputs_embeds=emb, vision_mask=vm)
        assert e.kv_lengths() == expected_kv(config, s), s
        m = pmod.open_engine(path, dtype="float32", retention=s)
        assert np.abs(got - m.prefill(inputs_embeds=emb, vision_mask=vm)).max() <= 1e-4
        assert [p.tolist() for p in e.kept_positions()] == [np.sort(p).tolist() for p in m.kept_positions()]


def test_export_at_a_retention(model, tmp_path, capsys):
    _torch()
    pytest.importorskip("onnxruntime")
    from pmod.static.manifest import MANIFEST
    from pmod_export.onnx_export import export_onnx

    config, tensors, path = model
    emb, vm = prompt(tensors)
    out = export_onnx(path, tmp_path / "onnx", N_VISION + 4, max_context=128, retention=0.5)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["retention"] == 0.5
    assert manifest["capacities"] == capacities(config, N_VISION + 4, 0.5)
    assert manifest["layer_ratios"] == expected_ratios(config, 0.5)
    ort = pmod.open_engine(out, backend="onnx", retention=0.5)
    torch_engine = pmod.open_engine(path, backend="torch", retention=0.5)
    a, b = ort.prefill(inputs_embeds=emb, vision_mask=vm), torch_engine.prefill(inputs_embeds=emb, vision_mask=vm)
    assert ort.retention == 0.5 and ort.kv_lengths() == expected_kv(config, 0.5)
    assert np.abs(a - b).max() <= 1e-4
    with pytest.raises(PmodError, match=r"exported at retention 0.5.*--retention 0.7"):
        pmod.open_engine(out, backend="onnx", retention=0.7)
    _trt_manifests_keep_it(config, path, tmp_path)
    manifest["retention"] = 1.0  # capacities no longer those of the recorded dial
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PmodError, match="do not match the schedule"):
        pmod.open_engine(out, backend="onnx")
    manifest["retention"] = -1
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PmodError, match="must be a number > 0"):
        pmod.open_engine(out, backend="onnx")


def _trt_manifests_keep_it(config, model_dir, tmp_path):
    """The TensorRT side reads a ``--target trt`` export's dial, ranges its profiles by the capacities at
    that dial, and keeps it in its own manifest (no GPU needed: the engine manifest is written as
    ``pmod trt build`` writes it)."""
    from dataclasses import replace

    from pmod.static.manifest import ENGINE_FORMAT
    from pmod_export.onnx_export import export_onnx
    from pmod_trt.manifest import read_engine_manifest, read_trt_export
    from pmod_trt.profiles import graph_profiles

    N = N_VISION + 4
    export = read_trt_export(export_onnx(model_dir, tmp_path / "trt-onnx", N, max_context=128, retention=0.5,
                                         target="trt"))
    assert export.retention == 0.5 and export.capacities == capacities(config, N, 0.5)
    engine_dir = tmp_path / "trt"
    engine_dir.mkdir()
    graphs = {}
    for g, spec in export.graphs.items():
        (engine_dir / f"{g}.engine").write_bytes(b"")
        graphs[g] = replace(spec, file=f"{g}.engine", external_data=None, source=spec.file,
                            profiles=[p.to_dict() for p in graph_profiles(export, g)])
    replace(export, format=ENGINE_FORMAT, graphs=graphs, engine={
        "tensorrt_version": "10.9.0.34", "gpu": {"name": "x", "compute_capability": "9.0"},
        "precision": "fp32"}).write(engine_dir)
    m = read_engine_manifest(engine_dir)
    assert m.retention == 0.5 and m.capacities == export.capacities
    first = m.graphs["prefill"].profiles[0]  # each MoD layer's carrier ranges up to its capacity at 0.5
    assert {k: v[2] for k, v in first.shapes.items() if k.startswith("keep_")} == {
        f"keep_{l}_0": [c] for l, (c, r) in enumerate(zip(m.capacities, m.layer_ratios)) if r is not None and c}


# ----------------------------------------------------------------------------- FLOPs, commands
def test_flops_at_a_retention(model, capsys):
    config, _, path = model
    for s in SETTINGS:
        rows = prefill_flops(config, N_VISION, N_TEXT, retention=s)["layers"]
        assert [r["kept_vision"] for r in rows] == capacities(config, N_VISION, s)
    # At 10 every MoD layer keeps every token: dense FLOPs plus the routers' scoring.
    rep = report(config, N_VISION, N_TEXT, retention=10.0)
    routers = sum(r["router"] for r in rep.pmod["layers"])
    assert rep.pmod["total"] == rep.dense["total"] + routers and rep.to_dict()["retention"] == 10.0
    half, trained = report(config, N_VISION, N_TEXT, retention=0.5), report(config, N_VISION, N_TEXT)
    assert half.pmod["total"] < trained.pmod["total"]
    assert main(["flops", str(path), "--vision-tokens", "30", "--retention", "0.5"]) == 0
    assert "p-MoD at retention 0.5" in capsys.readouterr().out


def test_generate_at_a_retention(model, capsys):
    pytest.importorskip("pmod_mlx")
    _, _, path = model
    assert main(["generate", "--model", str(path), "--prompt", "hello", "--max-tokens", "3",
                 "--retention", "0.5"]) == 0
    assert capsys.readouterr().out


def test_retention_sweep_script(tmp_path, capsys):
    pytest.importorskip("pmod_mlx")
    from lora_fixtures import make_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import retention_sweep

    path = make_model(tmp_path)
    out = tmp_path / "sweep"
    plot = importlib.util.find_spec("matplotlib") is not None
    assert retention_sweep.main(["--model", str(path), "--n", "2", "--values", "1,0.5", "--out", str(out),
                                 "--dtype", "float32"] + ([] if plot else ["--no-plot"])) == 0
    result = json.loads((out / "retention_sweep.json").read_text())
    assert [r["retention"] for r in result["rows"]] == [0.5, 1.0] and "dense" in result
    tflops = [r["flops"]["pmod_tflops"] for r in result["rows"]]
    assert tflops[0] < tflops[1] < result["dense"]["tflops"]
    assert "| 0.5 |" in (out / "retention_sweep.md").read_text()
    assert not plot or (out / "retention_sweep.png").stat().st_size > 0
    assert retention_sweep.main(["--model", str(path), "--values", "0,1"]) == 2
    assert "must be a number > 0" in capsys.readouterr().err
