"""``pmod convert``: official p-MoD / LLaVA checkpoints -> pmod checkpoint directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from official_checkpoint import (
    LAYOUTS, make_official_checkpoint, official_config_dict, random_pmod_tensors, tiny_official_config,
)
from pmod.app.cli import main
from pmod.config import PmodConfig
from pmod.convert import convert_checkpoint
from pmod.errors import PmodError
from pmod.format import load_numpy, read_config, save_checkpoint, validate
from pmod.schedule import layer_ratios, mod_layers

torch = pytest.importorskip("torch")

ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def model():
    """The tiny 32-layer p-MoD-LLaVA-NeXT (MoD layers 8..31 under the official D = 31)."""
    config = tiny_official_config()
    assert mod_layers(config) == list(range(8, 32))
    return config, random_pmod_tensors(config, seed=0)


def rounded(tensors: dict, dtype: str) -> dict:
    """The tensors as stored in ``dtype`` and widened back to float32."""
    return {k: torch.from_numpy(v).to(TORCH_DTYPES[dtype]).float().numpy() for k, v in tensors.items()}


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def ondisk_dtypes(path) -> set[str]:
    return {dt for _, dt in validate(path)[1].values()}


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_round_trip_exact(tmp_path, model, layout):
    config, tensors = model
    src = make_official_checkpoint(tmp_path / "src", config, tensors, layout, "float32")
    dst = convert_checkpoint(src, tmp_path / "dst", dtype="float32")
    assert dst == tmp_path / "dst"
    got_config, got = load_numpy(dst)
    assert_same(got, tensors)
    assert ondisk_dtypes(dst) == {"F32"}
    # the config round-trips, the official D = 31 included, and so does the schedule
    assert got_config.to_dict() == config.to_dict()
    assert got_config.mod_decay_span == 31
    assert layer_ratios(got_config) == layer_ratios(config)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    assert not list(tmp_path.glob(".dst.tmp-*"))


@pytest.mark.parametrize("layout", ["safetensors", "bin-sharded"])
@pytest.mark.parametrize("src_dtype", ["bfloat16", "float16"])
def test_half_sources_keep_their_dtype(tmp_path, model, layout, src_dtype):
    config, tensors = model
    src = make_official_checkpoint(tmp_path / "src", config, tensors, layout, src_dtype)
    dst = convert_checkpoint(src, tmp_path / "dst")
    assert ondisk_dtypes(dst) == {ST[src_dtype]}
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == src_dtype
    assert_same(load_numpy(dst)[1], rounded(tensors, src_dtype))


def test_float32_source_defaults_to_float16_and_dtype_overrides(tmp_path, model):
    config, tensors = model
    src = make_official_checkpoint(tmp_path / "src", config, tensors, "safetensors", "float32")
    dst = convert_checkpoint(src, tmp_path / "f16")
    assert ondisk_dtypes(dst) == {"F16"}
    assert_same(load_numpy(dst)[1], rounded(tensors, "float16"))
    dst = convert_checkpoint(src, tmp_path / "bf16", dtype="bfloat16")
    assert ondisk_dtypes(dst) == {"BF16"}
    assert_same(load_numpy(dst)[1], rounded(tensors, "bfloat16"))
    # a bfloat16 source widened to float32 keeps its values exactly
    src = make_official_checkpoint(tmp_path / "src-bf16", config, tensors, "bin", "bfloat16")
    dst = convert_checkpoint(src, tmp_path / "f32", dtype="float32")
    assert ondisk_dtypes(dst) == {"F32"}
    assert_same(load_numpy(dst)[1], rounded(tensors, "bfloat16"))


def test_legacy_bin_format(tmp_path):
    """A .bin saved in torch's pre-1.6 (non-zip) format is read without memory mapping."""
    config = tiny_official_config(num_hidden_layers=6, mod_decay_span=5)
    tensors = random_pmod_tensors(config, seed=4)
    src = make_official_checkpoint(tmp_path / "src", config, tensors, "bin", "bfloat16")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    dst = convert_checkpoint(src, tmp_path / "dst")
    assert ondisk_dtypes(dst) == {"BF16"}
    assert_same(load_numpy(dst)[1], rounded(tensors, "bfloat16"))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers on the config's rope_scaling key
def test_tokenizer_loads_with_autotokenizer(tmp_path, model):
    transformers = pytest.importorskip("transformers")
    config, tensors = model
    src = make_official_checkpoint(tmp_path / "src", config, tensors, "safetensors", "bfloat16")
    dst = convert_checkpoint(src, tmp_path / "dst")
    tok_src = transformers.AutoTokenizer.from_pretrained(str(src))
    tok_dst = transformers.AutoTokenizer.from_pretrained(str(dst))
    text = "USER : describe this image ASSISTANT : a red cat"
    ids = tok_dst(text)["input_ids"]
    assert ids == tok_src(text)["input_ids"]
    assert ids[0] == config.bos_token_id and 0 not in ids  # BOS prepended, no unknown words
    assert tok_dst.eos_token_id == config.eos_token_id
    assert len(tok_dst) == config.vocab_size


def _variants():
    six = dict(num_hidden_layers=6)
    return {
        # the config already has mod_decay_span: kept (6 layers, D = 5: MoD layers 2..5)
        "decay-span-in-config": dict(six, mod_decay_span=5),
        "shiftedlinear": dict(mod_target_layers="shiftedlinear_decay_0.5_0.25"),
        "deep_all": dict(six, mod_target_layers="deep_all", mod_decay_span=None, mod_router_factor=0.6),
        "interleave-no-router-bias": dict(six, mod_target_layers="interleave", mod_decay_span=None,
                                          mod_bias_enabled=False),
        "dense-llava": dict(six, mod_target_layers=None, mod_decay_span=None),
        "plain-llama": dict(six, mod_target_layers=None, mod_decay_span=None, mm_projector_type=None, mm_vision_tower=None,
                            mm_hidden_size=None, mm_patch_merge_type="flat", image_aspect_ratio="square",
                            image_grid_pinpoints=None),
        "llava-1.5-linear-projector": dict(six, mod_decay_span=5, mm_projector_type="linear",
                                           mm_patch_merge_type="flat", image_aspect_ratio="pad",
                                           image_grid_pinpoints=None),
        "biases-gqa1": dict(six, mod_decay_span=5, attention_bias=True, mlp_bias=True, num_key_value_heads=1),
        "tied-embeddings": dict(six, mod_decay_span=5, tie_word_embeddings=True),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_model_variants(tmp_path, name):
    config = tiny_official_config(**_variants()[name])
    tensors = random_pmod_tensors(config, seed=1)
    extra = {}
    if config.tie_word_embeddings:  # HF saves the tied head too; pmod drops it
        extra["lm_head.weight"] = tensors["language_model.embed_tokens.weight"]
    src = make_official_checkpoint(tmp_path / "src", config, tensors, "safetensors", "float32", extra=extra)
    raw = json.loads((src / "config.json").read_text())
    expected_type = {"dense-llava": "llava_llama", "plain-llama": "llama"}.get(name, "pmod_llava_llama")
    assert raw["model_type"] == expected_type
    dst = convert_checkpoint(src, tmp_path / "dst", dtype="float32")
    got_config, got = load_numpy(dst)
    assert_same(got, tensors)
    assert got_config.to_dict() == config.to_dict()
    assert layer_ratios(got_config) == layer_ratios(config)


def test_unused_tensors_are_dropped(tmp_path, model):
    config, tensors = model
    src = make_official_checkpoint(tmp_path / "src", config, tensors, "safetensors", "float32")
    from pmod.safetensors_io import read_header

    names = set(read_header(src / "model.safetensors"))
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in names
    assert "model.layers.8.decoder_layer.self_attn.rotary_emb.inv_freq" in names
    assert any(n.startswith("model.vision_tower.") for n in names)
    assert "model.layers.8.router.router.weight" in names and "model.mm_projector.2.bias" in names
    dst = convert_checkpoint(src, tmp_path / "dst", dtype="float32")
    assert_same(load_numpy(dst)[1], tensors)


def test_safetensors_convert_without_torch(tmp_path, model, monkeypatch):
    config, tensors = model
    src = make_official_checkpoint(tmp_path / "src", config, tensors, "safetensors-sharded", "bfloat16")
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now fails
    dst = convert_checkpoint(src, tmp_path / "dst")
    monkeypatch.undo()
    assert_same(load_numpy(dst)[1], rounded(tensors, "bfloat16"))


def test_import_pulls_no_torch():
    code = ("import sys, pmod.convert, pmod.app.cli; "
            "print(sorted(m for m in ('torch', 'tqdm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- runtime
def test_mlx_engine_same_logits_as_original(tmp_path, model):
    try:
        import pmod_mlx  # noqa: F401
    except ImportError as e:
        pytest.skip(f"pmod_mlx is not importable: {e}")
    import pmod

    config, tensors = model
    src = make_official_checkpoint(tmp_path / "src", config, tensors, "bin-sharded", "float32")
    converted = convert_checkpoint(src, tmp_path / "converted", dtype="float32")
    direct = save_checkpoint(tmp_path / "direct", config, tensors, dtype="float32")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, size=24)
    vision = np.zeros(24, dtype=bool)
    vision[4:20] = True
    emb = tensors["language_model.embed_tokens.weight"][ids].copy()
    emb[vision] = rng.standard_normal((int(vision.sum()), config.hidden_size)).astype(np.float32)
    results = []
    for path in (converted, direct):
        engine = pmod.open_engine(path, backend="mlx", dtype="float32")
        a = engine.prefill(input_ids=ids)
        b = engine.decode(5)
        engine.reset()
        c = engine.prefill(inputs_embeds=emb, vision_mask=vision)  # routes through the MoD layers
        results.append((a, b, c, engine.kv_lengths()))
    for got, want in zip(results[0], results[1]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert results[0][3][0] == 24 and results[0][3][-1] < 24  # the MoD layers skipped vision tokens


# --------------------------------------------------------------------------------- CLI
def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["convert", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_cli_convert(tmp_path, model, capsys):
    config, tensors = model
    src = make_official_checkpoint(tmp_path / "src", config, tensors, "safetensors", "bfloat16")
    rc, err = run_cli(capsys, src, tmp_path / "out", "--dtype", "float16")
    assert rc == 0, err
    assert "error" not in err and str(tmp_path / "out") in err
    assert ondisk_dtypes(tmp_path / "out") == {"F16"}
    assert read_config(tmp_path / "out").mod_decay_span == 31


def _official(tmp_path, layout="safetensors", config=None, tensors=None, **kw) -> Path:
    config = config or tiny_official_config(num_hidden_layers=6, mod_decay_span=5)
    tensors = tensors if tensors is not None else random_pmod_tensors(config, seed=2)
    return make_official_checkpoint(tmp_path / "src", config, tensors, layout, "float16", **kw)


def _edit_config(src: Path, **changes) -> Path:
    d = json.loads((src / "config.json").read_text())
    d.update(changes)
    (src / "config.json").write_text(json.dumps(d))
    return src


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _bad_src_missing(tmp_path):
    return tmp_path / "nope", ["nope", "does not exist"]


def _bad_src_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file", ["not a directory"]


def _bad_no_config(tmp_path):
    src = _official(tmp_path)
    (src / "config.json").unlink()
    return src, ["no config.json"]


def _bad_config_not_json(tmp_path):
    src = _official(tmp_path)
    (src / "config.json").write_text('{"model_type": "pmod_llava_llama",')
    return src, ["config.json", "not valid JSON"]


def _bad_config_not_object(tmp_path):
    src = _official(tmp_path)
    (src / "config.json").write_text("[1, 2]")
    return src, ["config.json", "JSON object"]


def _bad_model_type(tmp_path):
    return _edit_config(_official(tmp_path), model_type="mistral"), ["'mistral'", "pmod_llava_llama"]


def _bad_model_type_missing(tmp_path):
    src = _official(tmp_path)
    d = json.loads((src / "config.json").read_text())
    del d["model_type"]
    (src / "config.json").write_text(json.dumps(d))
    return src, ["no 'model_type'"]


def _bad_config_value(tmp_path):
    return _edit_config(_official(tmp_path), mod_target_layers="bogus"), ["config.json", "mod_target_layers", "bogus"]


def _bad_already_pmod(tmp_path):
    config = tiny_official_config(num_hidden_layers=6, mod_decay_span=5)
    src = save_checkpoint(tmp_path / "src", config, random_pmod_tensors(config))
    return src, ["already a pmod checkpoint"]


def _bad_no_weights(tmp_path):
    src = _official(tmp_path)
    (src / "model.safetensors").unlink()
    return src, ["holds no weights", "model.safetensors"]


def _bad_truncated_safetensors(tmp_path):
    src = _official(tmp_path)
    _truncate(src / "model.safetensors")
    return src, ["model.safetensors", "truncated"]


def _bad_corrupt_safetensors(tmp_path):
    src = _official(tmp_path)
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (src / "model.safetensors").write_bytes(bytes(data))
    return src, ["model.safetensors", "corrupt"]


def _bad_corrupt_bin(tmp_path):
    src = _official(tmp_path, "bin")
    (src / "pytorch_model.bin").write_bytes(os.urandom(4096))
    return src, ["pytorch_model.bin", "corrupt"]


def _bad_truncated_bin(tmp_path):
    src = _official(tmp_path, "bin")
    _truncate(src / "pytorch_model.bin", 0.6)
    return src, ["pytorch_model.bin", "corrupt"]


def _bad_missing_shard(tmp_path):
    src = _official(tmp_path, "safetensors-sharded")
    (src / "model-00002-of-00003.safetensors").unlink()
    return src, ["model-00002-of-00003.safetensors", "missing", "model.safetensors.index.json"]


def _bad_missing_bin_shard(tmp_path):
    src = _official(tmp_path, "bin-sharded")
    (src / "pytorch_model-00003-of-00003.bin").unlink()
    return src, ["pytorch_model-00003-of-00003.bin", "missing"]


def _bad_corrupt_index(tmp_path):
    src = _official(tmp_path, "safetensors-sharded")
    (src / "model.safetensors.index.json").write_text("{}")
    return src, ["model.safetensors.index.json", "weight_map"]


def _bad_index_lies(tmp_path):
    src = _official(tmp_path, "safetensors-sharded")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src, ["'model.norm.weight'", "model-00001-of-00003.safetensors"]


def _bad_missing_tensor(tmp_path):
    src = _official(tmp_path, drop=["model.layers.3.decoder_layer.mlp.up_proj.weight"])
    return src, ["'model.layers.3.decoder_layer.mlp.up_proj.weight'", "missing"]


def _bad_missing_projector(tmp_path):
    src = _official(tmp_path, "bin", drop=["model.mm_projector.2.weight"])
    return src, ["'model.mm_projector.2.weight'", "missing"]


def _bad_unknown_tensor(tmp_path):
    src = _official(tmp_path, extra={"model.mm_resampler.weight": np.zeros((2, 2), np.float32)})
    return src, ["'model.mm_resampler.weight'"]


def _bad_unknown_router_name(tmp_path):
    src = _official(tmp_path, extra={"model.layers.1.router.weight": np.zeros((1, 32), np.float32)})
    return src, ["unknown tensor 'model.layers.1.router.weight'"]


def _bad_wrapped_and_plain(tmp_path):
    src = _official(tmp_path, extra={"model.layers.3.mlp.up_proj.weight": np.zeros((64, 32), np.float32)})
    return src, ["layer 3 has both wrapped", "'model.layers.3.mlp.up_proj.weight'"]


def _bad_unexpected_bias(tmp_path):
    src = _official(tmp_path, extra={"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})
    return src, ["'model.layers.0.self_attn.q_proj.bias'", "attention_bias"]


def _bad_layer_out_of_range(tmp_path):
    src = _official(tmp_path, extra={"model.layers.6.mlp.up_proj.weight": np.zeros((64, 32), np.float32)})
    return src, ["'model.layers.6.mlp.up_proj.weight'", "num_hidden_layers = 6"]


def _bad_shape(tmp_path):
    src = _official(tmp_path, "bin-sharded", drop=["model.layers.1.mlp.down_proj.weight"],
                    extra={"model.layers.1.mlp.down_proj.weight": np.zeros((32, 63), np.float32)})
    return src, ["'model.layers.1.mlp.down_proj.weight'", "(32, 63)", "(32, 64)"]


def _bad_routers_not_in_schedule(tmp_path):
    # an official 6-layer checkpoint trained with D = 5 but saved without mod_decay_span:
    # the official D = 31 makes every layer dense
    config = tiny_official_config(num_hidden_layers=6, mod_decay_span=5)
    src = _official(tmp_path, config=config)
    d = json.loads((src / "config.json").read_text())
    del d["mod_decay_span"]
    (src / "config.json").write_text(json.dumps(d))
    return src, ["layers 2, 3, 4, 5 have routers but the schedule 'shiftedcos_decay_0.85_0.15' makes them dense",
                 "mod_decay_span = 31"]


def _bad_routers_extra_and_lacking(tmp_path):
    # weights of the 0.85 schedule (MoD layers 8..31), routers of layers 30, 31 lost,
    # config of the 0.80 schedule (MoD layers 10..31)
    tensors = random_pmod_tensors(tiny_official_config(), seed=3)
    for i in (30, 31):
        del tensors[f"language_model.layers.{i}.router.weight"], tensors[f"language_model.layers.{i}.router.bias"]
    config = tiny_official_config(mod_target_layers="shiftedcos_decay_0.80_0.15")
    assert mod_layers(config) == list(range(10, 32))
    src = _official(tmp_path, config=config, tensors=tensors)
    return src, ["layers 8, 9 have routers but the schedule 'shiftedcos_decay_0.80_0.15' makes them dense",
                 "layers 30, 31 lack routers but the schedule 'shiftedcos_decay_0.80_0.15' routes them"]


def _bad_dense_config_with_routers(tmp_path):
    src = _official(tmp_path)
    d = json.loads((src / "config.json").read_text())
    d = {k: v for k, v in d.items() if not k.startswith("mod_")}
    (src / "config.json").write_text(json.dumps(d))
    return src, ["layers 2, 3, 4, 5 have routers", "dense"]


BAD = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("_bad_")}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input(tmp_path, capsys, case):
    src, needles = BAD[case](tmp_path)
    dst = tmp_path / "out" / "converted"
    (tmp_path / "out").mkdir()
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    rc, err = run_cli(capsys, src, dst)
    assert rc == 2
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("pmod: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not dst.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before  # no temp dir either


def test_cli_dst_exists(tmp_path, model, capsys):
    src = _official(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, err = run_cli(capsys, src, dst)
    assert rc == 2 and err.count("pmod: error: ") == 1 and "already exists" in err and str(dst) in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


@pytest.mark.parametrize("layout", ["bin", "bin-sharded"])
def test_cli_bin_without_torch(tmp_path, capsys, monkeypatch, layout):
    src = _official(tmp_path, layout)
    monkeypatch.setitem(sys.modules, "torch", None)
    rc, err = run_cli(capsys, src, tmp_path / "dst")
    assert rc == 2 and err.count("pmod: error: ") == 1 and "Traceback" not in err
    assert "pip install torch" in err and "safetensors" in err and ".bin" in err
    assert not (tmp_path / "dst").exists()


def test_failure_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    src = _official(tmp_path)
    import pmod.format

    def broken(path, tensors, metadata=None):
        raise PmodError(f"{path}: no space left on device")

    monkeypatch.setattr(pmod.format, "write_file", broken)
    rc, err = run_cli(capsys, src, tmp_path / "dst")
    assert rc == 2 and err.count("pmod: error: ") == 1 and "no space left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unknown_dtype_is_an_error(tmp_path):
    src = _official(tmp_path)
    with pytest.raises(PmodError, match="unknown dtype 'int8'"):
        convert_checkpoint(src, tmp_path / "dst", dtype="int8")
    assert not (tmp_path / "dst").exists()


def test_official_config_dict_is_official(model):
    config, _ = model
    d = official_config_dict(config, wrapped_layers=range(8, 32))
    assert d["model_type"] == "pmod_llava_llama" and d["architectures"] == ["PmodLlavaLlamaForCausalLM"]
    assert "mod_decay_span" not in d and "pmod_format_version" not in d
    assert d["mod_target_layer_indices"] == list(range(8, 32))
    for key in ("mod_router_factor", "mod_weight_norm", "mod_bias_enabled", "mod_special_init",
                "mod_target_token_type", "mm_vision_tower", "tune_mm_mlp_adapter", "use_cache",
                "tokenizer_model_max_length", "image_grid_pinpoints"):
        assert key in d
    # with a non-default span the official config keeps it (a hand-edited config)
    six = tiny_official_config(num_hidden_layers=6, mod_decay_span=5)
    assert official_config_dict(six)["mod_decay_span"] == 5
    assert mod_layers(PmodConfig.from_dict(official_config_dict(six))) == [2, 3, 4, 5]
