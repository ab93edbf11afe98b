"""``scripts/gpu_check.py`` rehearsed on the CPU (``--device cpu --preset tiny``), so that the run
on a lent GPU cannot fail on a typo; and one failing stage leaves the others reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from pmod.app import gpu_check  # noqa: E402
from pmod.app.bench import check_schema  # noqa: E402

ARGS = ["--device", "cpu", "--preset", "tiny", "--vision-tokens", "32", "--repeat", "1", "--decode-tokens", "2"]


def _stages(out):
    return {s["name"]: s for s in json.loads((out / "gpu_check.json").read_text())["stages"]}


def test_rehearsal_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gc"
    assert gpu_check.main(ARGS + ["--out", str(out)]) == 0
    stages = _stages(out)
    assert [stages[n]["status"] for n in ("runtimes", "checkpoint", "torch", "bench")] == ["ok"] * 4
    assert stages["onnx"]["status"] == stages["trt"]["status"] == "skipped" and "--device cuda" in stages["trt"]["reason"]
    ckpt = stages["checkpoint"]["details"]
    assert "seeded" in ckpt["weights"] and sorted(p.name for p in Path(ckpt["path"]).iterdir()) == ["config.json"]
    for mode in ("dense", "pmod"):
        check = stages["torch"]["details"][mode]
        assert check["greedy_equal"] and check["kv_lengths_equal"] and check["rel_err"] <= 1e-4
        assert check["layers_keeping_other_tokens"] == []
    doc = json.loads((out / "bench.json").read_text())
    check_schema(doc)
    assert {(r["mode"], r["vision_tokens"]) for r in doc["results"]} == {("dense", 32), ("pmod", 32)}
    assert all(r["kv_bytes"] == r["kv_bytes_analytic"] for r in doc["results"])
    md = (out / "gpu_check.md").read_text()
    assert "| torch | ok |" in md and "torch    p-MoD" in md and md in capsys.readouterr().out


def test_a_failing_stage_does_not_hide_the_others(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("simulated kernel fault\nsecond line")

    out = tmp_path / "gc"
    assert gpu_check.main(ARGS + ["--out", str(out)]) == 0  # a good run's files first, then a failing one
    monkeypatch.setattr(gpu_check, "_check_against_cpu", broken)
    assert gpu_check.main(ARGS + ["--out", str(out)]) == 1
    stages = _stages(out)
    assert stages["torch"]["status"] == "failed" and stages["torch"]["reason"] == "simulated kernel fault"
    assert stages["onnx"]["status"] == stages["trt"]["status"] == "skipped"  # still reported
    assert stages["bench"]["status"] == "skipped" and "torch stage failed" in stages["bench"]["reason"]
    md = (out / "gpu_check.md").read_text()
    assert "| torch | failed |" in md and "torch    p-MoD" not in md  # no table from another run
