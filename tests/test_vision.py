"""pmod_mlx.vision.VisionTower against transformers.CLIPVisionModel on tiny random towers."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mx = pytest.importorskip("mlx.core")

from builders import tiny_config  # noqa: E402
from hf_llava import randomize  # noqa: E402

from pmod.errors import PmodError  # noqa: E402
from pmod.format import vision_layers_used, vision_tensors  # noqa: E402
from pmod_mlx.vision import VisionTower, sanitize  # noqa: E402

TOL = 1e-4
PREFIX = "vision_tower."


def vision_dict(image_size=28, patch_size=14, layers=3, hidden_act="quick_gelu"):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                image_size=image_size, patch_size=patch_size, num_channels=3, layer_norm_eps=1e-5,
                hidden_act=hidden_act, projection_dim=16)


def hf_tower(vision: dict, seed: int = 0):
    """A CLIPVisionModel with every parameter random (biases and LayerNorms too, unlike HF's init)."""
    torch.manual_seed(seed)
    return randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).eval(), seed)


def to_pmod_names(state_dict: dict, n_layers: int) -> dict[str, np.ndarray]:
    """HF CLIPVisionModel state_dict -> pmod tensors.

    ``vision_model.`` (transformers 4; 5 has no prefix) becomes ``vision_tower.``;
    ``post_layernorm`` and encoder layers ``>= n_layers`` are dropped.
    """
    out = {}
    for name, t in state_dict.items():
        name = name.removeprefix("vision_model.")
        m = re.match(r"encoder\.layers\.(\d+)\.", name)
        if name.startswith("post_layernorm.") or name.endswith("position_ids") or (m and int(m[1]) >= n_layers):
            continue
        out[PREFIX + name] = t.detach().numpy().astype(np.float32)
    return out


def load_tower(config, tensors: dict[str, np.ndarray]) -> VisionTower:
    weights = sanitize({k: mx.array(v) for k, v in tensors.items()})
    tower = VisionTower(config)
    tower.load_weights([(k.removeprefix(PREFIX), v) for k, v in weights.items()], strict=True)
    mx.eval(tower.parameters())
    return tower


def compare(vision: dict, select_layer: int = -2, select_feature: str = "patch", batch: int = 2, seed: int = 0):
    config = tiny_config(vision_config=vision, mm_vision_select_layer=select_layer,
                         mm_vision_select_feature=select_feature)
    hf = hf_tower(vision, seed)
    tensors = to_pmod_names(hf.state_dict(), vision_layers_used(config))
    expected = vision_tensors(config)
    assert set(tensors) == set(expected)
    assert all(tensors[k].shape == expected[k] for k in expected)
    tower = load_tower(config, tensors)

    S = vision["image_size"]
    pixels = torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        ref = hf(pixels, output_hidden_states=True).hidden_states[select_layer]
    if select_feature == "patch":
        ref = ref[:, 1:]
    got = tower(pixels.numpy())  # numpy NCHW in
    P = S // vision["patch_size"]
    assert got.shape == (batch, P * P + (select_feature == "cls_patch"), vision["hidden_size"])
    assert got.dtype == mx.float32
    err = float(np.abs(np.array(got) - ref.numpy()).max())
    assert err <= TOL, err
    return tower, pixels, err


@pytest.mark.parametrize("image_size", [28, 42, 30])  # 2x2, 3x3, and 2x2 with a partial patch dropped
def test_matches_transformers(image_size):
    compare(vision_dict(image_size=image_size))


@pytest.mark.parametrize("select_layer", [-1, -3, -4, 0, 1, 2, 3])
def test_select_layer(select_layer):
    compare(vision_dict(), select_layer=select_layer, batch=1)


def test_cls_patch():
    compare(vision_dict(), select_feature="cls_patch")


def test_gelu():
    compare(vision_dict(hidden_act="gelu"), batch=1)


def test_runs_only_needed_layers():
    config = tiny_config(vision_config=vision_dict(layers=5), mm_vision_select_layer=-2)
    assert len(VisionTower(config).encoder.layers) == 4
    config = tiny_config(vision_config=vision_dict(layers=5), mm_vision_select_layer=1)
    assert len(VisionTower(config).encoder.layers) == 1


def test_mx_input_and_float16():
    tower, pixels, _ = compare(vision_dict(), batch=1)
    a = tower(pixels.numpy())
    assert np.array_equal(np.array(tower(mx.array(pixels.numpy()))), np.array(a))
    tower.set_dtype(mx.float16)
    h = tower(pixels.numpy())
    assert h.dtype == mx.float16
    assert float(np.abs(np.array(h.astype(mx.float32)) - np.array(a)).max()) < 0.05


def test_sanitize_layout_and_idempotent():
    w = mx.arange(32 * 3 * 14 * 14, dtype=mx.float32).reshape(32, 3, 14, 14)
    other = mx.ones((4, 4))
    once = sanitize({PREFIX + "embeddings.patch_embedding.weight": w, "x.weight": other})
    assert once[PREFIX + "embeddings.patch_embedding.weight"].shape == (32, 14, 14, 3)
    assert np.array_equal(np.array(once[PREFIX + "embeddings.patch_embedding.weight"]),
                          np.array(w).transpose(0, 2, 3, 1))
    assert once["x.weight"] is other
    twice = sanitize(once)
    assert np.array_equal(np.array(twice[PREFIX + "embeddings.patch_embedding.weight"]),
                          np.array(once[PREFIX + "embeddings.patch_embedding.weight"]))


def test_errors_name_the_key():
    with pytest.raises(PmodError, match="mm_vision_select_feature"):
        VisionTower(tiny_config(vision_config=vision_dict(), mm_vision_select_feature="cls"))
    with pytest.raises(PmodError, match="hidden_act"):
        VisionTower(tiny_config(vision_config=vision_dict(hidden_act="relu")))
    with pytest.raises(PmodError, match="mm_vision_select_layer"):
        VisionTower(tiny_config(vision_config=vision_dict(), mm_vision_select_layer=-5))
    with pytest.raises(PmodError, match="vision_config"):
        VisionTower(tiny_config())
    tower = VisionTower(tiny_config(vision_config=vision_dict()))
    with pytest.raises(PmodError, match=r"\[N, 3, 28, 28\]"):
        tower(np.zeros((1, 28, 28, 3), np.float32))  # NHWC by mistake
