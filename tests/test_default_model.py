"""The embedded default model, `pmod demo`, and the training script that makes the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pmod
from pmod.cli import main
from pmod.format import validate
from pmod.models import DEFAULT_MODEL

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

shipped = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(),
                             reason="the embedded model is not in this checkout")


@shipped
def test_shipped_checkpoint_validates_and_is_small():
    config, found = validate(DEFAULT_MODEL)
    assert config.is_mod and config.num_hidden_layers >= 12 and config.vision_config is not None
    assert {dt for _, dt in found.values()} == {"F16"}
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size <= 25 * 1024 * 1024
    assert (config.vision_config["image_size"] // config.vision_config["patch_size"]) ** 2 >= 144


@shipped
def test_shipped_model_answers_held_out_questions():
    from eval_default_model import evaluate
    from pmod import shapes

    samples = shapes.make_samples("test", 40, seed=1, questions_per_image=1)
    r = evaluate(DEFAULT_MODEL, samples, dense=False)
    assert sum(r["right"].values()) / 40 >= 0.75, r  # measured: 90.6% on 500 test questions (README)


@shipped
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--questions", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 3 and "TFLOPs" in out and "KV-cache entries" in out
    png = tmp_path / "pmod-demo-routing.png"
    assert str(png) in out
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 3 * im.height  # input + three layer panels


@shipped
def test_commands_default_to_the_embedded_model(capsys):
    assert main(["generate", "--prompt", "hello", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().err == ""  # the answer alone on stdout


def test_short_training_run_lowers_the_loss(tmp_path):
    from train_default_model import main as train

    out = tmp_path / "m"
    assert train(["--out", str(out), "--vision-steps", "16", "--vision-batch-size", "8", "--steps", "24",
                  "--batch-size", "8", "--width", "32", "--questions-per-image", "3", "--eval-every", "12",
                  "--val-size", "16", "--warmup", "4", "--learning-rate", "3e-3", "--workers", "1"]) == 0
    log = json.loads((out / "training.json").read_text())
    for losses, n in ((log["vision_losses"], 16), (log["losses"], 24)):
        assert len(losses) == n and np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    config, _ = validate(out)
    engine = pmod.open_engine(out, dtype="float32")
    assert engine.config.vision_config["image_size"] == 96
    assert train(["--out", str(out), "--steps", "1"]) == 2  # refuses to overwrite


def test_patch_labels_follow_the_scene():
    from train_default_model import GRID, PATCH, patch_labels
    from pmod import shapes

    s = shapes.make_samples("train", 1, seed=3)[0]
    colour, shape, centre, across, down = patch_labels(s.scene)
    assert centre.sum() == len(s.scene.objects)
    for o in s.scene.objects:
        i = min(int(o.cy) // PATCH, GRID - 1) * GRID + min(int(o.cx) // PATCH, GRID - 1)
        assert centre[i] == 1
        assert list(shapes.COLOURS)[colour[i] - 1] == o.colour
        assert list(shapes.SHAPES)[shape[i] - 1] == o.shape
        if abs(o.cx - 48) >= shapes.POSITION_GAP * 96:
            assert across[i] == (1 if o.cx < 48 else 2)
    assert ((colour == 0) == (shape == 0)).all() and ((shape == 0) == (down == 0)).all() and (colour == 0).mean() > 0.5  # mostly background


def test_scene_labels_answer_the_generators_questions():
    """The scene labels hold the generator's own answers to its count, existence and position
    questions (the kind a question names is read back from its words)."""
    from train_default_model import KINDS, scene_labels
    from pmod import shapes

    n, checked = 1 + len(KINDS), {"count": 0, "existence": 0, "position": 0}
    for s in shapes.make_samples("train", 80, seed=5, questions_per_image=6):
        labels = scene_labels(s.scene)
        for qtype, q, a in s.qa:
            if qtype not in checked:
                continue
            words = q.rstrip("?.").split()
            colour = next((c for c in shapes.COLOURS if c in words), None)
            shape = next((k for k, plural in shapes.SHAPES.items() if k in words or plural in words), None)
            kind = None if colour is None and shape is None else KINDS.index((colour, shape))
            if qtype == "count":
                assert shapes.NUMBERS[labels[0 if kind is None else 1 + kind]] == a, q
            elif qtype == "existence":
                assert (labels[1 + kind] > 0) == (a == "yes"), q
            else:
                side = labels[n + kind] if a in ("left", "right") else labels[n + len(KINDS) + kind]
                assert side == (1 if a in ("left", "top") else 2), q
            checked[qtype] += 1
    assert min(checked.values()) >= 20, checked


@shipped
def test_exported_embedded_model_answers_like_mlx(tmp_path):
    """The shipped model through ONNX Runtime gives MLX's answers to the demo's questions."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    from pmod import shapes
    from pmod.generate import Sampler, SamplerArgs
    from pmod.session import Reply, open_session
    from pmod_export.onnx_export import export_onnx

    onnx_dir = export_onnx(DEFAULT_MODEL, tmp_path / "onnx")
    sessions = {"mlx": open_session(DEFAULT_MODEL, dtype="float32"), "onnx": open_session(onnx_dir, backend="onnx")}
    sampler = Sampler(SamplerArgs(temp=0.0))
    asked = 0
    for s in shapes.make_samples("demo", 4, seed=0, questions_per_image=3):
        for _, q, _ in s.qa:
            answers = {}
            for name, session in sessions.items():
                session.reset()
                reply = Reply()
                for _ in session.ask(q, images=[s.image], max_tokens=8, sampler=sampler, reply=reply):
                    pass
                answers[name] = (reply.text, session.engine.kv_lengths())
            assert answers["onnx"] == answers["mlx"], q
            asked += 1
    assert asked >= 10


def test_text_scene_holds_the_answers():
    """The decoder probe's --text-scene is fair only if the words hold the answers: each position
    question's answer is the side written after the one object the question names."""
    from decoder_probe import scene_text
    from pmod import shapes

    checked = 0
    for s in shapes.make_samples("train", 80, seed=7, questions_per_image=6):
        objects = [d.split() for d in scene_text(s.scene).rstrip(". ").split(", ")]
        assert len(objects) == len(s.scene.objects)
        for _, q, a in (qa for qa in s.qa if qa[0] == "position"):
            words = q.rstrip("?.").split()
            colour = next((c for c in shapes.COLOURS if c in words), None)
            shape = next((k for k in shapes.SHAPES if k in words), None)
            named = [o for o in objects if colour in (None, o[0]) and shape in (None, o[1])]
            assert len({tuple(o) for o in named}) == 1 and a in named[0][2:], (q, a, objects)
            checked += 1
    assert checked >= 80


@shipped
def test_decoder_probe_reports_accuracy_per_type(tmp_path, capsys):
    from decoder_probe import main as probe

    assert probe(["--text-scene", "--workers", "1", "--steps", "2", "--layers", "2", "--batch-size", "2",
                  "--questions-per-image", "2", "--val-size", "8", "--eval-every", "1"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "probe step 2" in ln]
    assert lines and "accuracy" in lines[0] and "%" in lines[0]
    for bad in (["--types", "colour,size"], ["--model", str(tmp_path)]):
        with pytest.raises(SystemExit):
            probe(bad)
        assert "error:" in capsys.readouterr().err
