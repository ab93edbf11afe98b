"""``pmod convert`` of llava-hf checkpoints and ``--vision-tower`` CLIP towers.

The checkpoints are saved by transformers itself (tests/hf_llava.py); the expected tensors
come from loading them back through transformers and renaming with the mapping written
out here, independently of ``pmod.convert``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_llava import (  # noqa: E402
    KEY_STYLES, NEXT_PINPOINTS, TINY_VISION, clip_vision_state, load_hf_llava, make_clip_tower, make_hf_llava,
)
from official_checkpoint import (  # noqa: E402
    VISION_TOWER, make_official_checkpoint, official_tower_state_dict, random_pmod_tensors, tiny_official_config,
)

from pmod.app.cli import build_parser, main  # noqa: E402
from pmod.convert import convert_checkpoint  # noqa: E402
from pmod.errors import PmodError  # noqa: E402
from pmod.format import load_numpy, validate  # noqa: E402
from pmod.schedule import layer_ratios, mod_layers  # noqa: E402

#: What the tiny tower's config becomes in the pmod config (projection_dim is not kept).
VISION_CONFIG = {"model_type": "clip_vision_model",
                 **{k: v for k, v in TINY_VISION.items() if k != "projection_dim"}}
COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json",
          "processor_config.json", "chat_template.jinja")


# ------------------------------------------------------------------ the expected mapping
def hf_to_pmod(state: dict, vision_layers: int, tied: bool = False) -> dict[str, np.ndarray]:
    """transformers-5 Llava(Next)ForConditionalGeneration state_dict -> pmod tensors (float32)."""
    out = {}
    for k, t in state.items():
        if k.startswith("model.language_model."):
            new = "language_model." + k[len("model.language_model."):]
        elif k == "lm_head.weight":
            if tied:
                continue
            new = "language_model.lm_head.weight"
        elif k.startswith("model.vision_tower."):
            rest = k[len("model.vision_tower."):]
            m = re.match(r"encoder\.layers\.(\d+)\.", rest)
            if rest.startswith("post_layernorm.") or (m and int(m[1]) >= vision_layers):
                continue
            new = "vision_tower." + rest
        elif k.startswith("model.multi_modal_projector."):
            new = "projector." + k[len("model.multi_modal_projector."):]
        elif k == "model.image_newline":
            new = "image_newline"
        else:
            raise KeyError(k)
        out[new] = t.detach().float().numpy()
    return out


def clip_to_pmod(clip: dict, vision_layers: int) -> dict[str, np.ndarray]:
    out = {}
    for k, v in clip.items():
        m = re.match(r"encoder\.layers\.(\d+)\.", k)
        if k.startswith("post_layernorm.") or (m and int(m[1]) >= vision_layers):
            continue
        out["vision_tower." + k] = v
    return out


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def one_error(excinfo, *needles) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ------------------------------------------------------------------------------- llava-hf
@pytest.mark.parametrize("key_style", KEY_STYLES)
def test_llava15_round_trip(tmp_path, key_style, capsys):
    src = make_hf_llava(tmp_path / "src", "1.5", key_style=key_style)
    hf = load_hf_llava(src)  # every naming scheme is one transformers loads
    dst = convert_checkpoint(src, tmp_path / "dst", dtype="float32")
    assert "warning" not in capsys.readouterr().err
    config, got = load_numpy(dst)
    assert_same(got, hf_to_pmod(hf.state_dict(), vision_layers=2))
    # a dense LLaVA-1.5 with its tower
    assert config.mod_target_layers is None and mod_layers(config) == []
    assert layer_ratios(config) == [None, None]
    assert not any(".router." in n for n in got)
    assert config.vision_config.to_dict() == VISION_CONFIG
    assert (config.mm_projector_type, config.mm_hidden_size) == ("mlp2x_gelu", 24)
    assert (config.mm_vision_select_layer, config.mm_vision_select_feature) == (-2, "patch")
    assert (config.image_aspect_ratio, config.mm_patch_merge_type) == ("pad", "flat")  # LlavaImageProcessor do_pad
    assert config.image_grid_pinpoints is None
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (
        128, 32, 2, 2)
    assert (config.rms_norm_eps, config.rope_theta, config.tie_word_embeddings) == (1e-5, 10000.0, False)
    raw = json.loads((dst / "config.json").read_text())
    assert raw["model_type"] == "pmod_llava_llama" and raw["torch_dtype"] == "float32"
    for f in COPIED:
        assert (dst / f).read_bytes() == (src / f).read_bytes(), f
    tok = transformers.AutoTokenizer.from_pretrained(str(dst))
    assert tok.convert_tokens_to_ids("<image>") == json.loads((src / "config.json").read_text())["image_token_index"]


def test_llava_next_round_trip_sharded_float16(tmp_path):
    src = make_hf_llava(tmp_path / "src", "next", seed=3, dtype="float16", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    hf = load_hf_llava(src)
    dst = convert_checkpoint(src, tmp_path / "dst")  # float16 stays float16, exactly
    assert {dt for _, dt in validate(dst)[1].values()} == {"F16"}
    config, got = load_numpy(dst)
    want = hf_to_pmod(hf.state_dict(), vision_layers=2)
    assert "image_newline" in want
    assert_same(got, want)
    assert config.mod_target_layers is None
    assert (config.image_aspect_ratio, config.mm_patch_merge_type) == ("anyres", "spatial_unpad")
    # transformers' [height, width] pinpoints become the official [width, height], in order
    assert NEXT_PINPOINTS == [[28, 56], [56, 56], [84, 28]]
    assert config.image_grid_pinpoints == [[56, 28], [56, 56], [28, 84]]
    assert config.vision_config.to_dict() == VISION_CONFIG
    for f in COPIED:
        assert (dst / f).read_bytes() == (src / f).read_bytes(), f


def test_llava_next_legacy_names_bfloat16(tmp_path):
    src = make_hf_llava(tmp_path / "src", "next", seed=4, dtype="bfloat16", key_style="legacy")
    hf = load_hf_llava(src)
    dst = convert_checkpoint(src, tmp_path / "dst")
    assert {dt for _, dt in validate(dst)[1].values()} == {"BF16"}
    assert_same(load_numpy(dst)[1], hf_to_pmod(hf.state_dict(), vision_layers=2))


@pytest.mark.parametrize("processor,files,aspect", [
    ("llava", "processor", "pad"),        # transformers 5: only processor_config.json (nested image_processor)
    ("llava", "preprocessor", "pad"),
    ("clip", "both", "square"),           # CLIPImageProcessor: resize + center crop
    (None, None, "square"),               # no processor config: square, with a warning
])
def test_llava15_aspect_ratio_from_the_processor(tmp_path, capsys, processor, files, aspect):
    src = make_hf_llava(tmp_path / "src", "1.5", processor=processor, processor_files=files or "both")
    dst = convert_checkpoint(src, tmp_path / "dst")
    err = capsys.readouterr().err
    config = load_numpy(dst)[0]
    assert config.image_aspect_ratio == aspect
    if processor is None:
        assert "warning" in err and "preprocessor_config.json" in err and "'pad'" in err
    else:
        assert "warning" not in err
    for f in ("preprocessor_config.json", "processor_config.json"):
        if (src / f).is_file():
            assert (dst / f).read_bytes() == (src / f).read_bytes()
    if files == "processor":  # transformers 5: the image processor is written out for pmod.image
        nested = json.loads((src / "processor_config.json").read_text())["image_processor"]
        assert json.loads((dst / "preprocessor_config.json").read_text()) == nested
    assert (dst / "preprocessor_config.json").is_file() == (processor is not None)


def test_llava_variants(tmp_path):
    # CLS kept, the first layer's features, tied embeddings
    src = make_hf_llava(tmp_path / "src", "1.5", seed=5, vision_feature_layer=1,
                        vision_feature_select_strategy="full", tie_word_embeddings=True,
                        text=dict(tie_word_embeddings=True))
    hf = load_hf_llava(src)
    config, got = load_numpy(convert_checkpoint(src, tmp_path / "dst", dtype="float32"))
    assert (config.mm_vision_select_layer, config.mm_vision_select_feature) == (1, "cls_patch")
    assert config.tie_word_embeddings
    want = hf_to_pmod(hf.state_dict(), vision_layers=1, tied=True)
    assert "language_model.lm_head.weight" not in want and "vision_tower.encoder.layers.0.mlp.fc1.weight" in want
    assert_same(got, want)


def test_hub_style_partial_configs(tmp_path):
    """llava-hf hub configs leave out keys at transformers' defaults (llava-1.5-7b-hf's, abridged)."""
    from pmod.convert.llava_hf import hf_llava_config

    d = {"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
         "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
         "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                         "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                         "torch_dtype": "float16", "vocab_size": 32064},
         "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
         "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                           "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                           "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
         "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_pad": True,
        "image_processor_type": "LlavaImageProcessor", "size": {"shortest_edge": 336}}))
    c = hf_llava_config(d, tmp_path)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim) == (32064, 4096, 11008, 32, 32, 32, 128)
    assert (c.max_position_embeddings, c.rms_norm_eps, c.rope_theta, c.pad_token_id) == (4096, 1e-5, 10000.0, 32001)
    assert c.vision_config.to_dict() == {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                               "num_hidden_layers": 24, "num_attention_heads": 16, "num_channels": 3,
                               "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
                               "layer_norm_eps": 1e-5}
    assert (c.mm_hidden_size, c.image_aspect_ratio, c.mm_vision_select_layer) == (1024, "pad", -2)
    # LLaVA-NeXT without image_grid_pinpoints and without a vision_config: LlavaNextConfig's defaults
    (tmp_path / "preprocessor_config.json").unlink()
    d = {k: v for k, v in d.items() if k != "vision_config"}
    c = hf_llava_config({**d, "model_type": "llava_next"}, tmp_path)
    assert c.vision_config.image_size == 336 and c.vision_config.num_hidden_layers == 24
    assert c.image_grid_pinpoints == [[672, 336], [336, 672], [672, 672], [336, 1008], [1008, 336]]
    assert (c.image_aspect_ratio, c.mm_patch_merge_type) == ("anyres", "spatial_unpad")


def _edit(src: Path, **changes) -> Path:
    d = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        target = d
        *path, last = key.split("__")
        for p in path:
            target = target[p]
        target[last] = value
    (src / "config.json").write_text(json.dumps(d))
    return src


def _rewrite(src: Path, drop=(), add=None) -> Path:
    from safetensors.numpy import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    for name in drop:
        del state[name]
    state.update(add or {})
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


HF_BAD = {
    "feature-layer-list": (dict(vision_feature_layer=[-2, -1]), None,
                           ["vision_feature_layer = [-2, -1]", "several layers", "one layer"]),
    "projector-act": (dict(projector_hidden_act="relu"), None, ["projector_hidden_act 'relu'", "mlp2x_gelu"]),
    "projector-no-bias": (dict(multimodal_projector_bias=False), None, ["multimodal_projector_bias = False"]),
    "select-strategy": ({}, dict(vision_feature_select_strategy="bogus"), ["'bogus'", "'default'", "'full'"]),
    "text-mistral": ({}, dict(text_config__model_type="mistral"), ["text_config model_type 'mistral'", "LLaMA"]),
    "vision-siglip": ({}, dict(vision_config__model_type="siglip_vision_model"),
                      ["vision_config has model_type 'siglip_vision_model'", "CLIP"]),
    "feature-layer-out-of-range": ({}, dict(vision_feature_layer=-5), ["vision_feature_layer = -5", "3 layers"]),
    "text-shape": ({}, dict(text_config__intermediate_size=60),
                   ["'language_model.model.layers.0.mlp.", "has shape", "60", "config.json"]),
    "tower-shape": ({}, dict(vision_config__intermediate_size=40),
                    ["'vision_tower.encoder.layers.0.mlp.fc1.", "(48", "(40", "intermediate_size 40"]),
}


@pytest.mark.parametrize("case", list(HF_BAD))
def test_llava_hf_bad_config(tmp_path, case):
    overrides, edits, needles = HF_BAD[case]
    src = make_hf_llava(tmp_path / "src", "1.5", processor=None, **overrides)
    if edits:
        _edit(src, **edits)
    with pytest.raises(PmodError) as e:
        convert_checkpoint(src, tmp_path / "dst")
    one_error(e, *needles)
    assert not (tmp_path / "dst").exists()


def test_llava_next_bad_pinpoints(tmp_path):
    src = make_hf_llava(tmp_path / "a", "next")
    _edit(src, image_grid_pinpoints=[[28, 56]])  # the processor still has NEXT_PINPOINTS
    with pytest.raises(PmodError) as e:
        convert_checkpoint(src, tmp_path / "dst")
    one_error(e, "image_grid_pinpoints [[28, 56]]", "image processor", str(NEXT_PINPOINTS))
    src = make_hf_llava(tmp_path / "b", "next", image_grid_pinpoints=[[28, 42], [56, 56]])
    with pytest.raises(PmodError) as e:
        convert_checkpoint(src, tmp_path / "dst")
    one_error(e, "[[28, 42], [56, 56]]", "image_size 28", "multiples")
    assert not (tmp_path / "dst").exists()


def test_llava_hf_bad_tensors(tmp_path):
    src = make_hf_llava(tmp_path / "a", "next", processor=None)
    _rewrite(src, drop=["image_newline"])
    with pytest.raises(PmodError) as e:
        convert_checkpoint(src, tmp_path / "dst")
    one_error(e, "'image_newline'", "missing")
    src = make_hf_llava(tmp_path / "b", "1.5", processor=None, key_style="prefixed")
    _rewrite(src, drop=["model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"])
    with pytest.raises(PmodError) as e:
        convert_checkpoint(src, tmp_path / "dst")
    one_error(e, "'model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias'", "missing")
    src = make_hf_llava(tmp_path / "c", "1.5", processor=None)
    _rewrite(src, add={"multi_modal_projector.linear_3.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(PmodError) as e:
        convert_checkpoint(src, tmp_path / "dst")
    one_error(e, "unknown tensor 'multi_modal_projector.linear_3.weight'")
    # the unused last tower layer and post_layernorm may be absent
    src = make_hf_llava(tmp_path / "d", "1.5", processor=None)
    names = [n for n in _names(src) if n.startswith("vision_tower.encoder.layers.2.") or "post_layernorm" in n]
    assert len(names) == 18
    _rewrite(src, drop=names)
    convert_checkpoint(src, tmp_path / "dst")
    with pytest.raises(PmodError) as e:  # and the tower is the checkpoint's own
        convert_checkpoint(src, tmp_path / "dst2", vision_tower=tmp_path / "anything")
    one_error(e, "llava-hf", "drop --vision-tower")


def _names(src: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "np") as f:
        return list(f.keys())


def test_cli_llava_hf(tmp_path, capsys):
    src = make_hf_llava(tmp_path / "src", "next")
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 0
    assert load_numpy(tmp_path / "out")[0].image_aspect_ratio == "anyres"
    _edit(src, projector_hidden_act="silu")
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("pmod: error: ") == 1 and "projector_hidden_act 'silu'" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ------------------------------------------------------------- official + --vision-tower
def _official(tmp_path, config=None, **kw) -> tuple[Path, dict]:
    config = config or tiny_official_config(num_hidden_layers=6, mod_decay_span=5)
    tensors = random_pmod_tensors(config, seed=2)
    kw.setdefault("vision_tower", False)
    src = make_official_checkpoint(tmp_path / "src", config, tensors, "safetensors", "float32", **kw)
    return src, tensors


@pytest.mark.parametrize("tower", ["vision-model", "legacy-prefix", "full-clip", "bin"])
def test_official_with_vision_tower(tmp_path, capsys, tower):
    kw = {"vision-model": {}, "legacy-prefix": dict(style="legacy"), "full-clip": dict(full=True),
          "bin": dict(fmt="bin", style="legacy")}[tower]
    clip = make_clip_tower(tmp_path / "clip", seed=1, **kw)
    src, tensors = _official(tmp_path)
    plain = load_numpy(convert_checkpoint(src, tmp_path / "plain", dtype="float32"))[0]
    assert "--vision-tower" in capsys.readouterr().err  # no tower: the warning says how to add one
    dst = convert_checkpoint(src, tmp_path / "dst", dtype="float32", vision_tower=clip)
    assert "warning" not in capsys.readouterr().err
    config, got = load_numpy(dst)
    assert_same(got, {**tensors, **clip_to_pmod(clip_vision_state(clip), vision_layers=2)})
    assert config.vision_config.to_dict() == VISION_CONFIG
    assert config.to_dict() == {**plain.to_dict(), "vision_config": VISION_CONFIG}
    assert mod_layers(config) == [2, 3, 4, 5]
    # the official code preprocesses with the tower's image processor: it comes along
    assert (dst / "preprocessor_config.json").read_bytes() == (clip / "preprocessor_config.json").read_bytes()


def test_official_tower_in_checkpoint_wins(tmp_path, capsys):
    """A checkpoint with its whole (fine-tuned) tower keeps it; CLIP_DIR gives the config."""
    clip = make_clip_tower(tmp_path / "clip", seed=1, processor=False)
    tuned = make_clip_tower(tmp_path / "tuned", seed=9)
    own = clip_vision_state(tuned)
    src, tensors = _official(tmp_path, extra=official_tower_state_dict(own))
    dst = convert_checkpoint(src, tmp_path / "dst", dtype="float32", vision_tower=clip)
    assert "warning" not in capsys.readouterr().err
    config, got = load_numpy(dst)
    assert_same(got, {**tensors, **clip_to_pmod(own, vision_layers=2)})
    assert config.vision_config.to_dict() == VISION_CONFIG
    assert not (dst / "preprocessor_config.json").exists()  # the CLIP dir has none
    # without --vision-tower the tower has no config: dropped, with a warning
    dst = convert_checkpoint(src, tmp_path / "dropped", dtype="float32")
    err = capsys.readouterr().err
    assert "warning" in err and "vision-tower tensors" in err and "--vision-tower" in err
    config, got = load_numpy(dst)
    assert config.vision_config is None
    assert_same(got, tensors)


def test_official_partial_tower_is_replaced(tmp_path, capsys):
    clip = make_clip_tower(tmp_path / "clip", seed=1)
    src, tensors = _official(tmp_path, vision_tower=True)  # the 5 CLIP tensors official_checkpoint writes
    assert len(VISION_TOWER) == 5
    dst = convert_checkpoint(src, tmp_path / "dst", dtype="float32", vision_tower=clip)
    err = capsys.readouterr().err
    assert "only 5 of the 37 vision-tower tensors" in err and str(clip) in err
    assert_same(load_numpy(dst)[1], {**tensors, **clip_to_pmod(clip_vision_state(clip), vision_layers=2)})


def test_unused_tower_layers_may_be_absent(tmp_path):
    clip = make_clip_tower(tmp_path / "clip", seed=1, style="legacy")
    from safetensors.numpy import load_file, save_file

    state = load_file(str(clip / "model.safetensors"))
    state = {k: v for k, v in state.items() if ".layers.2." not in k and "post_layernorm" not in k}
    save_file(state, str(clip / "model.safetensors"))
    src, _ = _official(tmp_path)
    config, got = load_numpy(convert_checkpoint(src, tmp_path / "dst", vision_tower=clip))
    assert config.vision_config.num_hidden_layers == 3 and "vision_tower.encoder.layers.1.mlp.fc2.bias" in got


def _mismatch_hidden(tmp_path):
    return make_clip_tower(tmp_path / "clip", hidden_size=32), None, [
        "hidden_size 32", "mm_hidden_size 24", "openai/clip-vit-large-patch14-336"]


def _mismatch_select_layer(tmp_path):
    return (make_clip_tower(tmp_path / "clip"),
            tiny_official_config(num_hidden_layers=6, mod_decay_span=5, mm_vision_select_layer=-5),
            ["mm_vision_select_layer = -5", "3 layers"])


def _mismatch_anyres_grid(tmp_path):
    return make_clip_tower(tmp_path / "clip", image_size=70), None, [
        "image_grid_pinpoints [[336, 672]", "image_size 70", "multiples"]


def _mismatch_image_not_patches(tmp_path):
    return make_clip_tower(tmp_path / "clip", image_size=30), None, [
        "image_size 30 is not a multiple of patch_size 14"]


def _mismatch_text_only(tmp_path):
    config = tiny_official_config(num_hidden_layers=6, mod_target_layers=None, mod_decay_span=None,
                                  mm_projector_type=None, mm_vision_tower=None, mm_hidden_size=None,
                                  mm_patch_merge_type="flat", image_aspect_ratio="square", image_grid_pinpoints=None)
    return make_clip_tower(tmp_path / "clip"), config, ["text-only", "drop it"]


def _mismatch_weights_vs_config(tmp_path):
    clip = make_clip_tower(tmp_path / "clip")
    d = json.loads((clip / "config.json").read_text())
    d["intermediate_size"] = 40
    (clip / "config.json").write_text(json.dumps(d))
    return clip, None, ["'encoder.layers.0.mlp.fc1.", str(clip / "model.safetensors"), "(48", "(40", "do not match"]


def _broken_missing(tmp_path):
    return tmp_path / "nope", None, ["vision tower", "nope", "does not exist"]


def _broken_file(tmp_path):
    (tmp_path / "clip.bin").write_bytes(b"x")
    return tmp_path / "clip.bin", None, ["not a directory"]


def _broken_no_config(tmp_path):
    clip = make_clip_tower(tmp_path / "clip")
    (clip / "config.json").unlink()
    return clip, None, ["has no config.json", "CLIPVisionModel"]


def _broken_config_json(tmp_path):
    clip = make_clip_tower(tmp_path / "clip")
    (clip / "config.json").write_text("{")
    return clip, None, [str(clip / "config.json"), "not valid JSON"]


def _broken_not_clip(tmp_path):
    clip = make_clip_tower(tmp_path / "clip")
    d = json.loads((clip / "config.json").read_text())
    d["model_type"] = "siglip_vision_model"
    (clip / "config.json").write_text(json.dumps(d))
    return clip, None, ["'siglip_vision_model'", "CLIP"]


def _broken_llava_dir(tmp_path):
    return make_hf_llava(tmp_path / "clip", processor=None), None, ["model_type 'llava'", "CLIP"]


def _broken_no_weights(tmp_path):
    clip = make_clip_tower(tmp_path / "clip")
    (clip / "model.safetensors").unlink()
    return clip, None, [str(clip), "holds no weights"]


def _broken_truncated(tmp_path):
    clip = make_clip_tower(tmp_path / "clip")
    data = (clip / "model.safetensors").read_bytes()
    (clip / "model.safetensors").write_bytes(data[:len(data) // 2])
    return clip, None, ["model.safetensors", "truncated"]


def _broken_missing_tensor(tmp_path):
    clip = make_clip_tower(tmp_path / "clip", style="legacy")
    from safetensors.numpy import load_file, save_file

    state = load_file(str(clip / "model.safetensors"))
    del state["vision_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(state, str(clip / "model.safetensors"))
    return clip, None, ["'encoder.layers.1.mlp.fc2.bias'", "missing from", str(clip)]


def _broken_no_vision_tensors(tmp_path):
    clip = make_clip_tower(tmp_path / "clip")
    from safetensors.numpy import save_file

    save_file({"text_model.embeddings.token_embedding.weight": np.zeros((4, 4), np.float32)},
              str(clip / "model.safetensors"))
    return clip, None, ["holds no CLIP vision tensors"]


TOWER_BAD = {n[1:]: fn for n, fn in dict(globals()).items() if n.startswith(("_mismatch_", "_broken_"))}


@pytest.mark.parametrize("case", list(TOWER_BAD))
def test_vision_tower_errors(tmp_path, case):
    clip, config, needles = TOWER_BAD[case](tmp_path)
    src, _ = _official(tmp_path, config=config)
    with pytest.raises(PmodError) as e:
        convert_checkpoint(src, tmp_path / "out" / "dst", vision_tower=clip)
    one_error(e, *needles)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_cli_vision_tower(tmp_path, capsys):
    if "--vision-tower" not in build_parser()._subparsers._group_actions[0].choices["convert"].format_help():
        pytest.skip("pmod convert has no --vision-tower flag yet")
    clip = make_clip_tower(tmp_path / "clip", seed=1)
    src, tensors = _official(tmp_path)
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "out"), "--vision-tower", str(clip), "--dtype", "float32"]) == 0
    assert load_numpy(tmp_path / "out")[0].vision_config.to_dict() == VISION_CONFIG
    (clip / "model.safetensors").write_bytes(b"\x08")
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "bad"), "--vision-tower", str(clip)]) == 2
    err = capsys.readouterr().err
    assert err.count("pmod: error: ") == 1 and "Traceback" not in err and "model.safetensors" in err
    assert not (tmp_path / "bad").exists()
