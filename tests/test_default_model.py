"""The embedded default model, `pmod demo`, and the training code that makes the model
(`pmod.tasks.shapes.train`, run by scripts/train_default_model.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pmod
from pmod.app.cli import main
from pmod.format import validate
from pmod.app.models import DEFAULT_MODEL

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name: str):
    """``scripts/<name>.py`` loaded as a module (scripts are entry points, not a package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shipped = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(),
                             reason="the embedded model is not in this checkout")


@shipped
def test_shipped_checkpoint_validates_and_is_small():
    config, found = validate(DEFAULT_MODEL)
    assert config.is_mod and config.num_hidden_layers >= 12 and config.vision_config is not None
    assert {dt for _, dt in found.values()} == {"F16"}
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size <= 25 * 1024 * 1024
    assert (config.vision_config.image_size // config.vision_config.patch_size) ** 2 >= 144


@shipped
def test_shipped_model_answers_held_out_questions():
    pytest.importorskip("pmod_mlx")
    from pmod.tasks.shapes.evaluate import evaluate
    from pmod.tasks import shapes

    samples = shapes.make_samples("test", 40, seed=1, questions_per_image=1)
    r = evaluate(DEFAULT_MODEL, samples, dense=False)
    assert sum(r["right"].values()) / 40 >= 0.85, r  # measured: 97.6% on 500 test questions (README)
    assert sum(c[1] for c in r["by_objects"].values()) == 40
    assert all(e[0] <= e[1] for e in r["elsewhere"].values())


def test_other_objects_answers_leave_out_the_named_object():
    from pmod.tasks.shapes.evaluate import other_objects_answers
    from pmod.tasks import shapes

    scene = shapes.Scene((shapes.Obj("star", "red", (225, 25, 25), 20, 20, 20),
                          shapes.Obj("circle", "blue", (30, 80, 225), 70, 20, 20),
                          shapes.Obj("circle", "green", (30, 170, 50), 70, 75, 20)), ((250,) * 3,) * 2 + (0.0,))
    assert other_objects_answers(scene, "what colour is the star?") == {"blue", "green", "circle", "right", "top",
                                                                       "bottom"}
    assert "red" in other_objects_answers(scene, "what colour is the blue circle?")
    assert other_objects_answers(scene, "how many circles are there?") >= {"red", "blue", "green"}


@shipped
def test_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("pmod_mlx")
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
    pytest.importorskip("pmod_mlx")
    assert main(["generate", "--prompt", "hello", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().err == ""  # the answer alone on stdout


def test_short_training_run_lowers_the_loss(tmp_path):
    pytest.importorskip("pmod_mlx")
    from pmod.tasks.shapes.train import main as train

    out = tmp_path / "m"
    assert train(["--out", str(out), "--vision-steps", "16", "--vision-batch-size", "8", "--steps", "24",
                  "--batch-size", "8", "--width", "32", "--questions-per-image", "3", "--eval-every", "12",
                  "--val-size", "16", "--warmup", "4", "--learning-rate", "3e-3", "--workers", "1"]) == 0
    log = json.loads((out / "training.json").read_text())
    for losses, n in ((log["vision_losses"], 16), (log["losses"], 24)):
        assert len(losses) == n and np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    config, _ = validate(out)
    engine = pmod.open_engine(out, dtype="float32")
    assert engine.config.vision_config.image_size == 96
    assert train(["--out", str(out), "--steps", "1"]) == 2  # refuses to overwrite


def test_patch_labels_follow_the_scene():
    from pmod.tasks.shapes.labels import GRID, PATCH, patch_labels
    from pmod.tasks import shapes

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
    from pmod.tasks.shapes.labels import KINDS, scene_labels
    from pmod.tasks import shapes

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
def test_binding_loss_is_the_attention_paid_to_the_named_object():
    """``binding`` points each turn at the position that predicts its reply and at the patches
    of the object its question names; ``binding_loss`` is -log of the attention mass, worked
    out here in float64 numpy from the layer's weights (HF RoPE, causal softmax), that head 0
    of the last dense layer pays them."""
    pytest.importorskip("pmod_mlx")
    import mlx.core as mx
    from pmod.tasks.shapes import batches, labels, losses
    from pmod.tasks.shapes.train import model_config
    from transformers import AutoTokenizer
    from pmod.tasks import shapes
    from pmod.image import ImageProcessorConfig
    from pmod.init import random_weights
    from pmod_mlx.model import Model
    from pmod_mlx.vision import sanitize

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    config = model_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, width=32)
    model = Model(config)
    model.load_weights(list(sanitize({k: mx.array(v) for k, v in random_weights(config, seed=1).items()}).items()))
    samples = shapes.make_samples("train", 3, seed=2, questions_per_image=4)
    batch = batches.qa_batch(tokenizer, config, ImageProcessorConfig.for_model(config), "train", 0, 3, 2, 4)[0]
    bind = batches.binding(samples, batch)
    caught = losses.LayerInput(losses.bind_layer(config))
    losses.language_logits(model, batch, layer_input=caught)
    loss = losses.binding_loss(model, caught.h, batch, bind).item()

    layer = model.language_model.layers[losses.bind_layer(config)]
    assert layer.ratio is None and model.language_model.layers[losses.bind_layer(config) + 1].ratio is not None
    f64 = lambda a: np.array(a.astype(mx.float32), np.float64)  # noqa: E731
    h, D = f64(caught.h), config.head_dim
    x = h / np.sqrt((h**2).mean(-1, keepdims=True) + config.rms_norm_eps) * f64(layer.input_layernorm.weight)
    inv = 1.0 / config.rope_theta ** (np.arange(0, D, 2) / D)

    def rope(v, pos):
        a = np.concatenate([pos[:, None] * inv] * 2, axis=-1)
        return v * np.cos(a) + np.concatenate([-v[:, D // 2:], v[:, :D // 2]], axis=-1) * np.sin(a)

    targets, image_pos = np.array(batch.targets), np.array(batch.image_pos)
    terms = []
    for b, s in enumerate(samples):
        T = x.shape[1]
        k = rope((x[b] @ f64(layer.self_attn.k_proj.weight).T)[:, :D], np.arange(T))
        cover = labels.patch_cover(s.scene)
        for j, (qtype, question, answer) in enumerate(s.qa):
            t = int(np.array(bind.query)[b, j])
            assert tokenizer.decode([int(targets[b, t])]).strip() == tokenizer.decode(
                tokenizer(answer, add_special_tokens=False).input_ids[:1]).strip()
            i = shapes.referent(s.scene, question)
            assert (i is not None) == (qtype in ("colour", "shape", "position")) == bool(np.array(bind.named)[b, j])
            if i is None:
                continue
            q = rope((x[b, t] @ f64(layer.self_attn.q_proj.weight).T)[None, :D], np.array([t]))[0]
            scores = k[:t + 1] @ q / np.sqrt(D)
            p = np.exp(scores - scores.max())
            p /= p.sum()
            mine = cover[:, i] >= 0.2
            assert mine.any() and (np.array(bind.patches)[b, j] == mine).all()
            terms.append(-np.log(p[image_pos[b][mine]].sum() + 1e-6))
    assert len(terms) >= 3
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-4)


@shipped
def test_exported_embedded_model_answers_like_mlx(tmp_path):
    """The shipped model through ONNX Runtime gives MLX's answers to the demo's questions."""
    pytest.importorskip("pmod_mlx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    from pmod.tasks import shapes
    from pmod.app.generate import Sampler, SamplerArgs
    from pmod.app.session import Reply, open_session
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


def test_scripts_import_the_package_not_each_other():
    """scripts/ holds entry points: none edits sys.path or imports another script, and the
    embedded model's training and evaluation scripts only call into pmod.tasks.shapes."""
    import ast

    names = {f.stem for f in SCRIPTS.glob("*.py")}
    assert {"train_default_model", "eval_default_model", "decoder_probe"} <= names
    for f in sorted(SCRIPTS.glob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Attribute) and node.attr == "path"
                        and isinstance(node.value, ast.Name) and node.value.id == "sys"), f"{f.name}: sys.path"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {m.split(".")[0] for m in modules} & names, f"{f.name} imports a script"
    for name, module in (("train_default_model", "pmod.tasks.shapes.train"),
                         ("eval_default_model", "pmod.tasks.shapes.evaluate")):
        imports = [n for n in ast.walk(ast.parse((SCRIPTS / f"{name}.py").read_text()))
                   if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert [(n.module, [a.name for a in n.names]) for n in imports] == [(module, ["main"])], name


def test_text_scene_holds_the_answers():
    """The decoder probe's --text-scene is fair only if the words hold the answers: each position
    question's answer is the side written after the one object the question names."""
    pytest.importorskip("pmod_mlx")  # the script trains on MLX
    scene_text = script("decoder_probe").scene_text
    from pmod.tasks import shapes

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
    pytest.importorskip("pmod_mlx")
    probe = script("decoder_probe").main

    assert probe(["--text-scene", "--workers", "1", "--steps", "2", "--layers", "2", "--batch-size", "2",
                  "--questions-per-image", "2", "--val-size", "8", "--eval-every", "1"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "probe step 2" in ln]
    assert lines and "accuracy" in lines[0] and "%" in lines[0]
    for bad in (["--types", "colour,size"], ["--model", str(tmp_path)]):
        with pytest.raises(SystemExit):
            probe(bad)
        assert "error:" in capsys.readouterr().err
