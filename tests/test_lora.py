"""LoRA in MLX: router gradients against finite differences (float64 reference), what is
trainable, zero-B and fused equivalence, resume determinism, the commands end to end."""

from __future__ import annotations

import numpy as np
import pytest
from lora_fixtures import make_model, write_shapes_jsonl

pytest.importorskip("pmod_mlx")  # its fast BLAS loads before mlx.core

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from builders import random_tensors, tiny_config  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from reference import Reference  # noqa: E402

from pmod.app.cli import main  # noqa: E402
from pmod.errors import PmodError  # noqa: E402
from pmod.format import read_config, validate  # noqa: E402
from pmod.lora_data import LoraSettings, TrainArgs, read_jsonl, resolve_args  # noqa: E402
from pmod.tokenizer import load_tokenizer  # noqa: E402
from pmod_mlx.loader import load  # noqa: E402
from pmod_mlx.lora.adapter import save_adapter  # noqa: E402
from pmod_mlx.lora.layers import adapter_weights, apply_lora, fuse_model  # noqa: E402
from pmod_mlx.lora.trainer import Trainer, peak_memory_bytes  # noqa: E402
from pmod_mlx.model import Model  # noqa: E402
from pmod_mlx.train import Example, collate, input_embeddings  # noqa: E402

ADAPTED = (".lora_a", ".lora_b", ".router.weight", ".router.bias")


def _model(config, tensors):
    m = Model(config)
    m.load_weights([(k, mx.array(v)) for k, v in tensors.items()], strict=True)
    return m


def _randomize_adapter(model, seed=0, scale=0.05):
    """Non-zero B (and moved routers / projector): an adapter that changes the model."""
    rng = np.random.default_rng(seed)
    model.update(nn.utils.tree_map(lambda p: p + mx.array(scale * rng.standard_normal(p.shape).astype(np.float32)),
                                   model.trainable_parameters()))
    mx.eval(model.parameters())


# ----------------------------------------------------------------------------- gradients
def test_router_gradient_matches_finite_differences_with_selection_fixed():
    """mx.grad through the MoD layers (float32) vs central differences of the independent float64
    reference, at a perturbation small enough that no layer's top-k selection changes."""
    config = tiny_config()
    base = random_tensors(config, seed=3)
    model = _model(config, base)
    mx.random.seed(0)
    settings = LoraSettings(rank=4, alpha=8)
    apply_lora(model, settings)
    _randomize_adapter(model, seed=1, scale=0.1)
    rng = np.random.default_rng(0)
    T, n_vis = 40, 24
    emb = rng.standard_normal((T, config.hidden_size)).astype(np.float32)
    vis = np.zeros(T, bool)
    vis[3:3 + n_vis] = True
    targets = rng.integers(0, config.vocab_size, T)

    def loss(m):
        logits = m.language_model(inputs_embeds=mx.array(emb)[None], vision_mask=vis[None])
        return nn.losses.cross_entropy(logits[0], mx.array(targets), reduction="mean")

    value, grads = nn.value_and_grad(model, loss)(model)
    grads = dict(tree_flatten(grads))
    # only the adapter is trainable: the frozen weights get no gradient at all
    assert set(grads) == set(adapter_weights(model)) and all(k.endswith(ADAPTED) for k in grads)

    adapter = {k: np.array(v).astype(np.float64) for k, v in adapter_weights(model).items()}

    def reference_loss(adapter):
        t = {k: v.astype(np.float64) for k, v in base.items()}
        for k, v in adapter.items():
            if k.endswith(".lora_a"):
                lin = k[:-len(".lora_a")]
                t[lin + ".weight"] = t[lin + ".weight"] + settings.scale * (v @ adapter[lin + ".lora_b"]).T
            elif not k.endswith(".lora_b"):
                t[k] = v
        ref = Reference(config, t)
        logits = ref.prefill(embeds=emb, vision_mask=vis)
        z = logits - logits.max(-1, keepdims=True)
        lse = np.log(np.exp(z).sum(-1))
        return float(np.mean(lse - z[np.arange(T), targets])), [None if k is None else k.copy() for k in ref.kept]

    ref_value, kept0 = reference_loss(adapter)
    assert abs(ref_value - value.item()) < 1e-5  # the runtime computes the reference's function
    mod_layers = [i for i, k in enumerate(kept0) if k is not None]
    assert len(mod_layers) >= 3 and any(len(kept0[i]) < n_vis for i in mod_layers)
    names = [f"language_model.layers.{i}.router.{w}" for i in mod_layers for w in ("weight", "bias")]
    names.append("language_model.layers.3.self_attn.q_proj.lora_b")  # a LoRA weight too
    eps = 1e-4
    for name in names:
        g = np.array(grads[name]).astype(np.float64)
        d = rng.standard_normal(g.shape)
        d /= np.linalg.norm(d)
        analytic = float((g * d).sum())
        vals = []
        for sign in (1, -1):
            v, kept = reference_loss({**adapter, name: adapter[name] + sign * eps * d})
            assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(kept, kept0)), \
                f"{name}: the perturbation changed a top-k selection"
            vals.append(v)
        numeric = (vals[0] - vals[1]) / (2 * eps)
        assert abs(numeric - analytic) <= 1e-3 * abs(analytic), (name, numeric, analytic)


def test_only_the_adapter_trains(tmp_path):
    config = tiny_config()
    model = _model(config, random_tensors(config, seed=0))
    frozen_before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    mx.random.seed(0)
    layers = apply_lora(model, LoraSettings(rank=2, target_modules="q,v", num_layers=3, train_routers=True))
    assert layers == [3, 4, 5]
    names = set(adapter_weights(model))
    assert names == {f"language_model.layers.{i}.self_attn.{p}_proj.lora_{ab}" for i in layers for p in "qv"
                     for ab in "ab"} | {f"language_model.layers.{i}.router.{w}" for i in layers
                                        for w in ("weight", "bias") if model.language_model.layers[i].ratio}
    import mlx.optimizers as optim

    ids = mx.array(np.arange(12, dtype=np.int32))[None]
    vis = np.zeros((1, 12), bool)
    vis[0, 2:10] = True

    def loss(m):
        return m.language_model(ids, vision_mask=vis).astype(mx.float32).square().mean()

    opt = optim.Adam(1e-2)
    for _ in range(2):
        _, g = nn.value_and_grad(model, loss)(model)
        opt.update(model, g)
        mx.eval(model.parameters())
    after = dict(tree_flatten(model.parameters()))
    for k, v in frozen_before.items():
        k2 = k.replace("q_proj.weight", "q_proj.linear.weight").replace("v_proj.weight", "v_proj.linear.weight") \
            if any(f"layers.{i}." in k for i in layers) else k
        if k.endswith((".router.weight", ".router.bias")) and any(f"layers.{i}." in k for i in layers):
            assert not np.array_equal(np.array(after[k2]), v), k  # trained in full
        else:
            assert np.array_equal(np.array(after[k2]), v), k  # frozen: bit for bit
    with pytest.raises(PmodError, match="no multimodal projector"):
        apply_lora(_model(config, random_tensors(config)), LoraSettings(train_projector=True))


# ----------------------------------------------------------------------------- equivalence
@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    path = make_model(root)
    data = write_shapes_jsonl(root / "data", n=24, text_rows=3)
    return path, data


def _batch(path, data, n=6):
    config = read_config(path)
    rows, _ = read_jsonl(data, load_tokenizer(path), config)
    rows = [r for r in rows if r.image_tokens][:n]
    return collate([Example(r.tokens, r.loss_mask, r._images) for r in rows], config.mod_target_token_type)


def _logits(model, batch):
    model.eval()
    out = model.language_model(inputs_embeds=input_embeddings(model, batch), vision_mask=batch.vision_mask)
    return np.array(out.astype(mx.float32))


def test_zero_b_lora_equals_base_and_fused_equals_lora(vlm, tmp_path):
    path, data = vlm
    batch = _batch(path, data)
    base = _logits(load(path, "float32"), batch)
    model = load(path, "float32")
    settings = LoraSettings(rank=4, alpha=8, train_projector=True, target_modules="q,k,v,o,gate,up,down,lm_head")
    mx.random.seed(0)
    apply_lora(model, settings)
    assert np.array_equal(_logits(model, batch), base)  # B = 0: exactly the base model

    _randomize_adapter(model, seed=2)
    lora = _logits(model, batch)
    assert np.abs(lora - base).max() > 1e-2  # the adapter changes the model
    adapter = save_adapter(model, settings, tmp_path / "adapter", base_model=path)
    assert main(["fuse", "--model", str(path), "--adapter-path", str(adapter), "--out", str(tmp_path / "fused")]) == 0
    _, found = validate(tmp_path / "fused")
    assert {dt for _, dt in found.values()} == {"F32"}  # the base's dtype
    assert (tmp_path / "fused" / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()
    fused = _logits(load(tmp_path / "fused", "float32"), batch)
    applied = _logits(load(path, "float32", adapter_path=adapter), batch)
    assert np.abs(fused - lora).max() <= 1e-5
    assert np.abs(applied - lora).max() <= 1e-5
    fuse_model(model)  # mlx-lm's LoRALinear.fuse gives the same merge
    assert np.abs(_logits(model, batch) - lora).max() <= 1e-5

    with pytest.raises(PmodError, match="pmod fuse"):
        import pmod

        pmod.open_engine(path, backend="torch", adapter_path=adapter)
    other = make_model(tmp_path, tiny_config(hidden_size=48, vision_config=read_config(path).vision_config,
                                             mm_projector_type="mlp2x_gelu", mm_hidden_size=32), name="other")
    with pytest.raises(PmodError, match="another model"):
        load(other, "float32", adapter_path=adapter)


# ----------------------------------------------------------------------------- training
def _args(path, data, out, **kw):
    base = dict(model=str(path), data=str(data), adapter_path=str(out), iters=8, batch_size=4, warmup=2,
                learning_rate=5e-3, save_every=3, steps_per_eval=4, val_batches=1, steps_per_report=2,
                dropout=0.1, seed=5)
    return TrainArgs(**{**base, **kw})


def _adapter(out):
    return {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}


def test_resumed_run_ends_with_the_uninterrupted_weights(vlm, tmp_path):
    path, data = vlm
    logs = []
    full = Trainer(_args(path, data, tmp_path / "full"), log=logs.append, progress=False).train()
    assert full["steps"] == 8 and full["val_loss"] is not None and full["peak_memory_gb"] > 0
    assert any("step 4: validation loss" in m for m in logs) and any("tok/s" in m for m in logs)

    t = Trainer(_args(path, data, tmp_path / "cut"), log=logs.append, progress=False)
    t.train(stop_after=7)  # "interrupted" after step 7: the last save is step 6
    assert _adapter(tmp_path / "cut").keys() == _adapter(tmp_path / "full").keys()
    args = resolve_args({"adapter_path": str(tmp_path / "cut")}, resume=True)
    assert (args.seed, args.dropout, args.iters, args.model) == (5, 0.1, 8, str(path.resolve()))  # saved settings
    resumed = Trainer(args, resume=True, log=logs.append, progress=False)
    assert resumed.step == 6
    resumed.train()
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(np.abs(a[k]).max() > 0 for k in a if k.endswith("lora_b"))  # it did train


def test_grad_checkpoint_gives_the_same_training(vlm, tmp_path):
    path, data = vlm
    kw = dict(iters=2, save_every=2, val_batches=0, dropout=0.0)
    Trainer(_args(path, data, tmp_path / "a", **kw), log=lambda m: None, progress=False).train()
    Trainer(_args(path, data, tmp_path / "b", grad_checkpoint=True, **kw), log=lambda m: None, progress=False).train()
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert peak_memory_bytes() > 0


def test_commands_lora_generate_fuse(vlm, tmp_path, capsys):
    path, data = vlm
    out = tmp_path / "adapter"
    cmd = ["lora", "--model", str(path), "--data", str(data), "--adapter-path", str(out), "--iters", "4",
           "--batch-size", "4", "--save-every", "2", "--val-batches", "1", "--steps-per-eval", "2",
           "--learning-rate", "1e-2", "--rank", "4", "--target-modules", "q,v,down", "--num-layers", "4"]
    assert main(cmd) == 0
    err = capsys.readouterr().err
    assert "training rows" in err and "step 2: validation loss" in err and "wrote" in err
    assert main(cmd) == 2 and "--resume" in capsys.readouterr().err  # will not overwrite
    assert main(["lora", "--adapter-path", str(out), "--resume", "--rank", "8"]) == 2
    assert "differs from the interrupted run" in capsys.readouterr().err
    assert main(["lora", "--adapter-path", str(out), "--resume", "--iters", "6", "--no-progress"]) == 0
    capsys.readouterr()

    image = next((data.parent / "images").glob("*.png"))
    ask = ["--prompt", "what colour is the circle?", "--image", str(image), "--max-tokens", "6", "--dtype", "float32"]
    assert main(["generate", "--model", str(path), "--adapter-path", str(out)] + ask) == 0
    with_adapter = capsys.readouterr().out
    assert main(["fuse", "--model", str(path), "--adapter-path", str(out), "--out", str(tmp_path / "fused")]) == 0
    assert main(["generate", "--model", str(tmp_path / "fused")] + ask) == 0
    assert capsys.readouterr().out == with_adapter
    assert main(["fuse", "--model", str(path), "--adapter-path", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_bad_rows_from_the_command_line(vlm, tmp_path, capsys):
    path, data = vlm
    bad = data.parent / "with-bad.jsonl"
    lines = data.read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ['{"conversations": [{"from": "robot", "value": "x"}]}'] + lines[3:]) + "\n")
    cmd = ["lora", "--model", str(path), "--data", str(bad), "--iters", "1", "--val-batches", "0", "--no-progress"]
    assert main(cmd + ["--adapter-path", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4: turn 1: unknown role 'robot'" in err and "--on-bad-row skip" in err
    assert not (tmp_path / "a").exists()
    assert main(cmd + ["--adapter-path", str(tmp_path / "b"), "--on-bad-row", "skip"]) == 0
    err = capsys.readouterr().err
    assert f"{bad}:4: turn 1: unknown role 'robot'" in err and "1 bad rows skipped" in err
