"""``pmod bench``: one end-to-end run on the tiny preset (every installed backend, dense and
p-MoD, three vision counts, --profile, --json, --plot), then its JSON: the schema, KV bytes
held equal to pmod.flops' analytic bytes, the profile's layers; a run at --retention 0.5;
and bad flags as one line.

The dense twins' logits against the float64 reference are checked in
tests/test_export.py (test_dense_twin_and_kept_positions: mlx, torch, onnx).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pmod.app.bench import PRESETS, SCHEMA, check_schema
from pmod.app.cli import main
from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.app.models import DEFAULT_MODEL
from pmod.schedule import layer_ratios

VISION = [7, 32, 96]
INSTALLED = [b for b, mods in (("mlx", ["mlx"]), ("torch", ["torch"]), ("onnx", ["onnxruntime", "onnx", "torch"]))
             if all(importlib.util.find_spec(m) for m in mods)]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache, and one BLAS / OpenMP thread per worker: these tests check what is
    measured, not how fast, and spinning thread pools crawl on a busy 2-core machine."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("pmod-cache")
        mp.setenv("PMOD_CACHE", str(path))
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            mp.setenv(var, "1")
        yield path


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    """The tiny benchmark, run once: (exit status, stdout, stderr, JSON, PNG path)."""
    import contextlib
    import io

    out_dir = tmp_path_factory.mktemp("bench")
    json_path, png = out_dir / "bench.json", out_dir / "bench.png"
    argv = ["bench", "--preset", "tiny", "--backend", "mlx,torch,onnx,trt", "--vision-tokens",
            ",".join(map(str, VISION)), "--decode-tokens", "2", "--repeat", "1", "--profile", "--json", str(json_path)]
    if HAS_MPL:
        argv += ["--plot", str(png)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    doc = json.loads(json_path.read_text()) if json_path.exists() else None
    return rc, stdout.getvalue(), stderr.getvalue(), doc, png


def test_runs_end_to_end(run):
    rc, stdout, stderr, doc, _ = run
    assert rc == 0, stderr
    assert INSTALLED, "no backend installed"
    assert sorted(doc["backends"]) == sorted(INSTALLED)
    assert "routing overhead" in stdout
    for b in INSTALLED:
        assert any(line.startswith(b) for line in stdout.splitlines())
        info = doc["backends"][b]
        assert info["matmul_peak"]["gflops"] > 0 and info["kv_dtype"] == "float32"
    if "mlx" in INSTALLED:
        assert doc["backends"]["mlx"]["blas"]["name"]
    assert doc["config"]["vision_tokens"] == VISION and doc["config"]["preset"] == "tiny"


def test_missing_backend_is_skipped_with_its_hint(run):
    rc, _, stderr, doc, _ = run
    if HAS_TRT:
        pytest.skip("tensorrt is installed")
    [skip] = [s for s in doc["skipped"] if s["backend"] == "trt"]
    assert "pip install 'pmod[trt]'" in skip["reason"]
    assert "trt skipped" in stderr and "pip install 'pmod[trt]'" in stderr


def test_json_matches_schema(run):
    doc = run[3]
    check_schema(doc)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(doc, SCHEMA)


def test_gpu_peak_column_only_with_a_device(run):
    """CPU runs report no device memory, and the table has no GPU column; a row with one shows it."""
    from pmod.app.bench import format_table

    doc = json.loads(json.dumps(run[3]))
    assert all(r["peak_device_bytes"] is None for r in doc["results"]) and "GPU peak" not in format_table(doc)
    doc["results"][0]["peak_device_bytes"] = 3 * 2**30
    check_schema(doc)
    table = format_table(doc)
    assert "GPU peak" in table and "3.0 GiB" in table


def test_schema_checker_rejects_bad_documents(run):
    doc = json.loads(json.dumps(run[3]))
    doc["results"][0]["mode"] = "sparse"
    with pytest.raises(PmodError, match=r"results\[0\]\.mode"):
        check_schema(doc)
    del doc["results"][0]["kv_bytes"]
    with pytest.raises(PmodError, match="kv_bytes"):
        check_schema(doc)
    with pytest.raises(PmodError, match="expected integer"):
        check_schema({"n": True}, {"type": "object", "properties": {"n": {"type": "integer"}}})


def test_kv_bytes_held_equal_the_analytic_bytes(run):
    rows = run[3]["results"]
    got = {(r["backend"], r["mode"], r["vision_tokens"]) for r in rows}
    assert got == {(b, m, n) for b in INSTALLED for m in ("dense", "pmod") for n in VISION}
    for r in rows:
        assert r["kv_bytes"] == r["kv_bytes_analytic"] > 0, r
        assert r["prefill_s"]["min"] <= r["prefill_s"]["median"] <= r["prefill_s"]["max"]
        assert r["gflops"] > 0 and r["peak_mem_bytes"] > 0 and r["decode_tok_s"] > 0
    by = {(r["backend"], r["mode"], r["vision_tokens"]): r["kv_bytes"] for r in rows}
    for b in INSTALLED:  # p-MoD's deep layers hold fewer vision tokens
        assert all(by[(b, "pmod", n)] < by[(b, "dense", n)] for n in VISION)


def test_profile_covers_every_layer(run):
    doc = run[3]
    ratios = layer_ratios(PmodConfig(**PRESETS["tiny"].config))
    profiled = {(p["backend"], p["mode"], p["vision_tokens"]): p for p in doc["profile"]}
    assert set(profiled) == {(b, m, n) for b in INSTALLED if b in ("mlx", "torch")
                             for m in ("dense", "pmod") for n in VISION}
    for (b, mode, n), p in profiled.items():
        assert [x["layer"] for x in p["layers"]] == list(range(len(ratios)))
        assert [x["mod"] for x in p["layers"]] == [mode == "pmod" and r is not None for r in ratios]
        for x in p["layers"]:
            parts = x["route_s"] + x["attention_s"] + x["mlp_s"] + x["merge_s"]
            assert x["total_s"] == pytest.approx(parts, rel=1e-6, abs=1e-9) and x["attention_s"] > 0
        assert all(x["route_s"] > 0 for x in p["layers"] if x["mod"])


def test_retention_changes_the_kv_held_as_counted(run, cache, tmp_path, capsys):
    """At --retention 0.5 every backend holds the KV bytes pmod.flops counts at 0.5, which
    are fewer than at the trained schedule (the run above); the dense twins do not change."""
    from pmod.flops import kv_bytes

    n, out = VISION[-1], tmp_path / "r.json"
    assert main(["bench", "--preset", "tiny", "--backend", ",".join(INSTALLED), "--vision-tokens", str(n),
                 "--decode-tokens", "1", "--repeat", "1", "--retention", "0.5", "--json", str(out)]) == 0
    assert "p-MoD at retention 0.5" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    check_schema(doc)
    assert doc["config"]["retention"] == 0.5
    if "onnx" in INSTALLED:  # exported at 0.5, beside the trained export of the run above
        manifest = json.loads((Path(doc["backends"]["onnx"]["path"]) / "manifest.json").read_text())
        assert manifest["retention"] == 0.5 and doc["backends"]["onnx"]["path"] != run[3]["backends"]["onnx"]["path"]
    config = PmodConfig(**PRESETS["tiny"].config)
    trained = {(r["backend"], r["mode"]): r["kv_bytes"] for r in run[3]["results"] if r["vision_tokens"] == n}
    got = {(r["backend"], r["mode"]): r for r in doc["results"]}
    assert set(got) == {(b, m) for b in INSTALLED for m in ("dense", "pmod")}
    for (b, mode), r in got.items():
        want = kv_bytes(config, n, r["text_tokens"], mode == "dense", "float32", retention=0.5)
        assert r["kv_bytes"] == r["kv_bytes_analytic"] == want, r
        if mode == "dense":
            assert r["kv_bytes"] == trained[(b, mode)]
        else:
            assert r["kv_bytes"] < trained[(b, mode)]


def test_readme_table_from_the_json(run, tmp_path):
    """scripts/bench.py turns the JSON into one Markdown row per (backend, vision count) and
    writes it between the README markers, leaving the rest of the file alone."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench import BEGIN, END, main as bench_main

    doc = run[3]
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\noutro\n")
    assert bench_main(["--from-json", str(src), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n{BEGIN}\n") and text.endswith(f"{END}\noutro\n") and "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| backend")]
    assert len(rows) == len(INSTALLED) * len(VISION)
    prefill = {(r["backend"], r["mode"], r["vision_tokens"]): r["prefill_s"]["median"] for r in doc["results"]}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        b, n = cells[0], int(cells[1])
        assert float(cells[4].rstrip("x")) == pytest.approx(prefill[(b, "dense", n)] / prefill[(b, "pmod", n)], abs=0.006)
        assert len(cells) == 12


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plot_is_a_png(run):
    from PIL import Image

    with Image.open(run[4]) as im:
        assert im.format == "PNG" and im.size[0] > 400
        im.verify()


@pytest.mark.skipif(HAS_MPL, reason="matplotlib is installed")
def test_plot_without_matplotlib_is_one_line(cache, tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err


@pytest.mark.parametrize("argv, words", [
    (["--preset", "tiny", "--backend", "mlx,cuda"], "unknown backend 'cuda'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--preset", "tiny", "--vision-tokens", "576,lots"], "--vision-tokens takes whole numbers"),
    (["--preset", "tiny", "--vision-tokens", "-5"], "--vision-tokens takes whole numbers"),
    (["--preset", "tiny", "--text-tokens", "1.5"], "invalid int value"),
    (["--preset", "tiny", "--repeat", "0"], "--repeat must be >= 1"),
    (["--preset", "tiny", "--retention", "0"], "--retention: must be a number > 0"),
    (["--preset", "tiny", "--vision-tokens", "96,1020"], "exceed the model's context of 1024"),
    (["--preset", "tiny", "--vision-tokens", "0", "--text-tokens", "0"], "at least one token"),
    (["--preset", "tiny", "--json", "/no/such/dir/out.json"], "its directory does not exist"),
    ([], "give --model DIR or --preset NAME"),
    (["--preset", "tiny", "--model", "x"], "not both"),
    (["--model", "/no/such/model"], "does not exist"),
])
def test_bad_flags_are_one_line(cache, capsys, argv, words):
    assert main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pmod: error: ") and words in lines[0], captured.err


@pytest.mark.skipif((DEFAULT_MODEL / "config.json").is_file(), reason="the embedded model is shipped")
def test_embedded_preset_without_the_model_is_one_line(cache, capsys):
    assert main(["bench", "--preset", "embedded"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "embedded default model is missing" in lines[0]


def test_profile_compares_kernels_with_their_twins_where_metal_runs(monkeypatch):
    pytest.importorskip("pmod_mlx")
    from pmod.engine import Engine
    from pmod_mlx import kernels
    from pmod_mlx.engine import MLXEngine

    assert list(Engine.kernel_settings(object())) == [None]  # a runtime without kernels (torch, onnx, trt)
    engine = object.__new__(MLXEngine)  # kernel_settings reads only .dense
    engine.dense = True
    assert list(engine.kernel_settings()) == [None]  # the dense twin routes nothing
    engine.dense = False
    monkeypatch.setattr(kernels, "enabled", lambda: False)  # no Metal: nothing to switch
    assert list(engine.kernel_settings()) == [None]
    monkeypatch.setattr(kernels, "enabled", lambda: True)  # as on a Mac
    seen = []
    for setting in engine.kernel_settings():
        seen.append((setting, kernels._enabled))
    assert seen == [(True, True), (False, False)] and kernels._enabled  # switched back on afterwards


RUNTIME_PACKAGES = ("mlx", "torch", "onnx", "onnxruntime", "tensorrt", "pmod_mlx", "pmod_export", "pmod_trt")


def test_bench_and_info_reach_runtimes_only_through_engines():
    """``pmod bench`` and ``pmod info`` import no runtime, not even inside a function: what they ask
    of one goes through ``open_engine`` and the engine interface, or ``pmod.app.registry``."""
    import ast

    import pmod.app

    app = Path(pmod.app.__file__).parent
    for path in [*sorted((app / "bench").glob("*.py")), app / "info.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            bad = [n for n in names if n.split(".")[0] in RUNTIME_PACKAGES]
            assert not bad, f"{path.name}:{node.lineno} imports {bad}"


def test_engine_without_runtime_methods_says_so_in_one_line():
    from pmod.engine import Engine

    class Bare(Engine):
        prefill = decode = kv_lengths = reset = lambda self, *a, **k: None
        position = 0

    engine = Bare()
    assert not engine.profiles_layers and list(engine.kernel_settings()) == [None]
    for call, words in ((lambda: engine.runtime_info(), "does not describe its runtime"),
                        (lambda: engine.matmul_probe(8), "has no matmul probe"),
                        (lambda: engine.profiled(object()), "has no per-layer profile")):
        with pytest.raises(PmodError, match=f"backend Bare {words}"):
            call()


def test_mlx_profiled_attaches_the_timer_for_the_block_only(cache):
    pytest.importorskip("pmod_mlx")
    import mlx.core as mx

    from pmod.app.bench import LayerTimer, make_prompt, preset_checkpoint
    from pmod.app.registry import open_engine

    engine = open_engine(preset_checkpoint("tiny"), backend="mlx")
    ratios = layer_ratios(engine.config)
    timer = LayerTimer(len(ratios))
    emb, mask = make_prompt(engine, 16, 8)
    with engine.profiled(timer):
        assert engine.model.language_model.probe is timer and timer.sync is mx.eval
        engine.prefill(inputs_embeds=emb, vision_mask=mask)
    assert engine.model.language_model.probe is None and timer.layer is None
    assert all(t["attention"] > 0 and t["mlp"] > 0 for t in timer.times)
    assert [t["route"] > 0 for t in timer.times] == [r is not None for r in ratios]
    info = engine.runtime_info()
    assert info["kv_dtype"] == "float32" and info["device"] in ("cpu", "metal") and info["blas"]["name"]
