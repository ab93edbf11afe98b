"""The pmod checkpoint directory: round trips and one-line errors on bad input."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from builders import random_tensors, tiny_config
from pmod.app.cli import main
from pmod.errors import PmodError
from pmod.format import expected_tensors, load_numpy, save_checkpoint, validate
from pmod.safetensors_io import float32_to_bf16_bits, read_header, to_float32, write_file


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3)])
def test_round_trip(tmp_path, dtype, tol):
    config = tiny_config()
    tensors = random_tensors(config)
    dst = save_checkpoint(tmp_path / "m", config, tensors, dtype=dtype, shard_bytes=20_000)
    assert (dst / "model.safetensors.index.json").exists()  # small shards force several files
    config2, loaded = load_numpy(dst)
    assert config2.to_dict() == config.to_dict()
    assert loaded.keys() == tensors.keys()
    for name, a in tensors.items():
        np.testing.assert_allclose(loaded[name], a, rtol=tol, atol=tol * np.abs(a).max())


def test_bf16_rounding_matches_float64_reference():
    x = np.array([1.0, 1.00390625, 1.01171875, -3.14159, 65504.0, 1e-30, np.inf], np.float32)
    bits = float32_to_bf16_bits(x)
    back = to_float32(bits, "BF16")
    # Round to nearest even on 8 mantissa bits, computed independently in float64.
    m, e = np.frexp(x[:-1].astype(np.float64))
    expect = np.ldexp(np.round(m * 256) / 256, e)
    np.testing.assert_array_equal(back[:-1], expect.astype(np.float32))
    assert back[-1] == np.inf


def _one_line_error(fn, *needles):
    with pytest.raises(PmodError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.fixture
def ckpt(tmp_path):
    config = tiny_config()
    return save_checkpoint(tmp_path / "m", config, random_tensors(config), dtype="float32")


def _rewrite(path, edit):
    """Rewrite a checkpoint file's tensors through ``edit(dict) -> dict``."""
    from pmod.safetensors_io import read_tensors

    header = read_header(path)
    arrays = {k: ("F32", np.array(v)) for k, v in read_tensors(path).items()}
    arrays = edit(arrays)
    write_file(path, arrays)
    return header


def test_missing_tensor(ckpt):
    name = "language_model.layers.3.router.weight"
    _rewrite(ckpt / "model.safetensors", lambda t: {k: v for k, v in t.items() if k != name})
    _one_line_error(lambda: validate(ckpt), name, "missing")


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt / "model.safetensors", lambda t: {**t, "language_model.layers.0.router.weight": ("F32", np.zeros((1, 32), np.float32))})
    _one_line_error(lambda: validate(ckpt), "language_model.layers.0.router.weight", "unexpected")


def test_misshaped_tensor(ckpt):
    name = "language_model.layers.1.mlp.up_proj.weight"
    _rewrite(ckpt / "model.safetensors", lambda t: {**t, name: ("F32", np.zeros((63, 32), np.float32))})
    _one_line_error(lambda: validate(ckpt), name, "(63, 32)", "(64, 32)")


def test_wrong_dtype(ckpt):
    name = "language_model.norm.weight"
    _rewrite(ckpt / "model.safetensors", lambda t: {**t, name: ("I32", np.zeros(32, np.int32))})
    _one_line_error(lambda: validate(ckpt), name, "I32")


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    _one_line_error(lambda: validate(ckpt), "truncated", "model.safetensors")
    f.write_bytes(data[:5])
    _one_line_error(lambda: validate(ckpt), "truncated")


def test_corrupt_header(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 64)
    _one_line_error(lambda: validate(ckpt), "corrupt")


def test_config_mismatch_and_version(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    _one_line_error(lambda: validate(ckpt), "language_model.layers.5")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "pmod_format_version": 99}))
    _one_line_error(lambda: validate(ckpt), "format version 99", "re-convert")
    del cfg["pmod_format_version"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _one_line_error(lambda: validate(ckpt), "pmod convert")


@pytest.mark.parametrize("key,value", [
    ("mod_target_layers", "cosine_decay_0.8_0.2"), ("mod_weight_norm", "relu_1_2"),
    ("hidden_act", "gelu"), ("num_key_value_heads", 3), ("rope_scaling", {"type": "yarn", "factor": 2}),
    ("mod_router_factor", 2.0), ("mod_target_token_type", "audio"), ("hidden_size", "32"),
])
def test_bad_config_values_name_the_key(tmp_path, key, value):
    config = tiny_config()
    d = {**config.to_dict(), key: value}
    (tmp_path / "config.json").write_text(json.dumps(d))
    _one_line_error(lambda: validate(tmp_path), key)


def test_failed_write_leaves_nothing(tmp_path):
    config = tiny_config()
    tensors = random_tensors(config)
    tensors["language_model.norm.weight"] = np.zeros(31, np.float32)
    with pytest.raises(PmodError):
        save_checkpoint(tmp_path / "out", config, tensors)
    assert list(tmp_path.iterdir()) == []

    def boom():
        raise KeyboardInterrupt

    tensors = random_tensors(config)
    tensors["language_model.layers.4.mlp.down_proj.weight"] = boom
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "out", config, tensors)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(ckpt):
    config = tiny_config()
    _one_line_error(lambda: save_checkpoint(ckpt, config, random_tensors(config)), "already exists")


def test_expected_tensors_follow_schedule():
    config = tiny_config()
    names = expected_tensors(config)
    routed = sorted({int(n.split(".")[2]) for n in names if ".router." in n})
    assert routed == [2, 3, 4, 5]  # 6 layers: r_l = cos(pi*l/5)/2 + 0.5 <= 0.85 from layer 2
    dense = expected_tensors(tiny_config(mod_target_layers=None))
    assert not any(".router." in n for n in dense)


def test_info_cli(ckpt, capsys):
    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "shiftedcos_decay_0.85_0.15" in out
    rows = [l.split() for l in out.splitlines() if l.strip()[:1].isdigit() and len(l.split()) == 5]
    assert [r[1] for r in rows] == ["dense", "dense", "MoD", "MoD", "MoD", "MoD"]
    assert main(["info", str(ckpt.parent / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pmod: error:") and "does not exist" in err[0]


def test_cli_bad_flag(capsys):
    assert main(["convert", "--dtype", "int3", "a", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pmod: error:")
