"""Image loading, CLIP / LLaVA-1.5 / LLaVA-NeXT preprocessing and packing (pmod.image) vs transformers.

transformers reads ``image_grid_pinpoints`` as ``[height, width]``, the official code (and
pmod) as ``[width, height]``; giving transformers the transposed list makes the two rules
identical, so the equality tests pass it ``_hw(PINS)``. Where the two readings of the same
list really differ (ties on small images, unpad rounding) a test pins the difference down.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from builders import tiny_config  # noqa: E402
from pmod.config import VisionConfig  # noqa: E402
from pmod.errors import PmodError  # noqa: E402
from pmod.image import (CLIP_MEAN, ImageProcessorConfig, anyres_grid, anyres_pixels,  # noqa: E402
                        anyres_plan, clip_pixels, load_image, num_image_tokens, pack_plan,
                        preprocess, select_best_resolution, to_rgb)

from transformers import (CLIPImageProcessorPil, LlavaImageProcessorPil,  # noqa: E402
                          LlavaNextImageProcessorPil)
from transformers.image_transforms import convert_to_rgb  # noqa: E402

PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # p-MoD / llava-hf default
PINS_9 = [[336 * a, 336 * b] for a, b in [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3], [3, 2], [2, 3],
                                          [3, 3], [2, 4], [4, 2]]]  # p-MoD max_num_sub_images=9
PINS_1X1 = [[336, 336], [336, 672], [672, 336], [1008, 672]]  # a 1x1 grid: one hr tile
#: a CLIP ViT-L/14 at 336 (only image_size and patch_size matter to the packing)
VISION = {"image_size": 336, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
          "num_hidden_layers": 24, "num_attention_heads": 16}
P = 24
# (width, height): square, landscape, portrait, wide, tall, tiny, tiny square, odd, huge, 1x1
SIZES = [(336, 336), (500, 375), (375, 500), (1000, 200), (60, 1500), (13, 77), (200, 200),
         (337, 335), (2000, 1500), (1, 1)]
CLIP_KW = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def _hw(pins):
    return [[b, a] for a, b in pins]


def _image(w, h, seed=0):
    """Noise plus a gradient: every frequency for the resampler, and some structure."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ramp = (np.linspace(0, 255, w)[None, :, None] + np.linspace(0, 255, h)[:, None, None]) / 2
    return Image.fromarray((noise // 2 + (ramp // 2).astype(np.uint8)).astype(np.uint8))


def _config(**kw):
    base = dict(vision_config=dict(VISION), image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                image_grid_pinpoints=PINS)
    return tiny_config(**{**base, **kw})


def _encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_with_size(w, h):
    """A valid 4x4 PNG whose IHDR claims ``w x h`` (CRC fixed up): a header-only bomb."""
    data = _encode(Image.new("RGB", (4, 4)), "PNG")
    chunk = b"IHDR" + struct.pack(">II", w, h) + data[24:29]
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


MAX_DIFF = {}  # measured max |ours - transformers|, printed with -s


def _close(ours, ref, what):
    assert ours.shape == ref.shape and ours.dtype == np.float32
    diff = float(np.abs(ours - ref).max())
    MAX_DIFF[what] = max(MAX_DIFF.get(what, 0.0), diff)
    assert diff <= 1e-6, f"{what}: max diff {diff}"


# ================================================================ CLIP / LLaVA-1.5
@pytest.mark.parametrize("size", SIZES + [(501, 376)])  # 336 * 501 / 376 = 447.7: truncated to 447
def test_clip_pixels_equal_transformers(size):
    im = _image(*size)
    ref = CLIPImageProcessorPil(**CLIP_KW)(im, return_tensors="np")["pixel_values"][0]
    _close(clip_pixels(im, ImageProcessorConfig()), ref, "clip")


@pytest.mark.parametrize("size", [(500, 375), (60, 1500), (13, 77), (336, 336)])
def test_pad_equals_llava_image_processor(size):
    im = _image(*size, seed=1)
    ref = LlavaImageProcessorPil(do_pad=True, **CLIP_KW)(im, return_tensors="np")["pixel_values"][0]
    out = preprocess(im, _config(image_aspect_ratio="pad"))
    _close(out.pixel_values[0], ref, "pad")
    assert out.pixel_values.shape == (1, 3, 336, 336) and out.original_size == size
    assert out.grid is None and np.array_equal(out.plan, np.arange(P * P))
    assert out.base_tokens == 0 and out.routed_mask("vision_hr").all()
    # llava-hf's do_pad in preprocessor_config.json means the same padding under 'square'
    proc = ImageProcessorConfig.from_dict({"image_processor_type": "LlavaImageProcessor", "do_pad": True,
                                           "size": {"shortest_edge": 336}, "crop_size": 336})
    assert proc.do_pad and proc.pad_color == tuple(int(x * 255) for x in CLIP_MEAN) == (122, 116, 104)
    assert np.array_equal(preprocess(im, _config(image_aspect_ratio="square"), proc).pixel_values, out.pixel_values)


def test_square_is_plain_clip():
    im = _image(700, 300)
    ref = CLIPImageProcessorPil(**CLIP_KW)(im, return_tensors="np")["pixel_values"][0]
    for aspect in ("square", "something_else"):
        _close(preprocess(im, _config(image_aspect_ratio=aspect)).pixel_values[0], ref, "clip")


def test_processor_config_from_json(tmp_path):
    openai = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
              "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(openai))
    assert ImageProcessorConfig.for_model(_config(), tmp_path) == ImageProcessorConfig()
    assert ImageProcessorConfig.for_model(_config(), tmp_path / "absent") == ImageProcessorConfig()
    next_hf = {"image_processor_type": "LlavaNextImageProcessor", "do_pad": True, "resample": 3,
               "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
               "image_grid_pinpoints": PINS, "rescale_factor": 0.00392156862745098}
    proc = ImageProcessorConfig.from_dict(next_hf)
    assert not proc.do_pad  # LlavaNext's do_pad pads a batch's tile counts, not the image
    assert ImageProcessorConfig.from_vision_config(VisionConfig.from_dict({**VISION, "image_size": 224})).crop_size == (224, 224)
    # a non-default processor is honoured: exact (h, w) resize, other mean/std, no crop
    d = {"size": {"height": 200, "width": 300}, "do_center_crop": False, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3, "resample": 2}
    im = _image(123, 456)
    ref = CLIPImageProcessorPil(size={"height": 200, "width": 300}, do_center_crop=False, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3, resample=2)(im, return_tensors="np")["pixel_values"][0]
    _close(clip_pixels(im, ImageProcessorConfig.from_dict(d)), ref, "clip")
    for bad in ({"size": "big"}, {"image_mean": [1, 2]}, {"image_std": [0, 1, 1]}, {"resample": "bicubic"}):
        with pytest.raises(PmodError, match="'(size|image_mean|image_std|resample)'"):
            ImageProcessorConfig.from_dict(bad)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(PmodError, match="not valid JSON"):
        ImageProcessorConfig.from_file(tmp_path / "bad.json")


# ================================================================ LLaVA-NeXT anyres
ANYRES_CASES = [pytest.param(size, pins, id=f"{name}-{size[0]}x{size[1]}")
                for name, pins in (("pmod", PINS), ("pmod9", PINS_9), ("with1x1", PINS_1X1))
                for size in SIZES if pins is PINS or size not in ((2000, 1500), (1, 1), (337, 335))]


@pytest.mark.parametrize("size, pins", ANYRES_CASES)
def test_anyres_pixels_equal_llava_next_processor(size, pins):
    im = _image(*size, seed=2)
    hf = LlavaNextImageProcessorPil(image_grid_pinpoints=_hw(pins), **CLIP_KW)(im, return_tensors="np")
    out = preprocess(im, _config(image_grid_pinpoints=pins))
    cols, rows = out.grid
    assert out.pixel_values.shape == (1 + cols * rows, 3, 336, 336)
    _close(out.pixel_values, hf["pixel_values"][0], "anyres")
    assert tuple(hf["image_sizes"][0]) == (size[1], size[0]) and out.original_size == size
    assert out.grid == anyres_grid(size, _config(image_grid_pinpoints=pins))
    assert np.array_equal(out.plan, pack_plan(size, _config(image_grid_pinpoints=pins)))
    assert out.base_tokens == P * P and out.tokens_per_tile == P * P
    assert out.routed_mask("vision_hr").sum() == out.num_tokens - P * P
    assert out.routed_mask("vision_all").all()


@pytest.mark.parametrize("size", [(500, 375), (60, 1500), (1000, 200), (2000, 1500)])
def test_anyres_llava_hf_pinpoints_agree_without_ties(size):
    """The llava-hf default list read as transformers reads it gives the same pixels when no tie."""
    im = _image(*size, seed=3)
    hf = LlavaNextImageProcessorPil(image_grid_pinpoints=PINS, **CLIP_KW)(im, return_tensors="np")
    pixels, _ = anyres_pixels(im, ImageProcessorConfig(), [tuple(p) for p in PINS], 336)
    _close(pixels, hf["pixel_values"][0], "anyres")


def test_pinpoint_order_differs_from_transformers_on_ties():
    """A small image fits every pinpoint fully: the smallest-area pinpoint that comes first
    wins. Officially [336, 672] is 336 wide (one column of two tiles); transformers reads it as
    336 high (one row of two). pmod follows the official reading, which p-MoD was trained on."""
    from transformers.image_processing_utils import select_best_resolution as hf_select
    for w, h in [(300, 200), (200, 300), (200, 200), (13, 77)]:
        assert select_best_resolution((w, h), [tuple(p) for p in PINS]) == (336, 672)
        assert hf_select((h, w), PINS) == (336, 672)  # (height, width): 672 wide
        assert hf_select((h, w), _hw(PINS)) == (672, 336)  # transposed list: the official grid


# ================================================================ packing plans
@pytest.fixture(scope="module")
def hf_next():
    """A tiny random LlavaNextForConditionalGeneration per pinpoint list (pack_image_features only)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    def make(pins):
        cfg = LlavaNextConfig(
            vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=8, intermediate_size=16,
                                           num_hidden_layers=1, num_attention_heads=2),
            text_config=LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2),
            image_grid_pinpoints=_hw(pins), image_token_index=63)
        torch.manual_seed(0)
        return LlavaNextForConditionalGeneration(cfg).eval()

    cache = {}

    def get(pins):
        key = json.dumps(pins)
        if key not in cache:
            cache[key] = make(pins)
        return cache[key]

    return get


def _apply(plan, feats, newline):
    return np.where((plan >= 0)[:, None], feats[np.maximum(plan, 0)], newline[None])


def _hf_pack(model, feats, size, n_tiles, newline):
    with torch.no_grad():
        packed, lens = model.pack_image_features(
            [torch.from_numpy(feats).view(n_tiles, P * P, -1)], torch.tensor([[size[1], size[0]]]),
            vision_feature_select_strategy="default", image_newline=torch.from_numpy(newline))
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0].numpy()


@pytest.mark.parametrize("pins", [PINS, PINS_9, PINS_1X1], ids=["pmod", "pmod9", "with1x1"])
def test_plan_equals_transformers_pack_image_features(hf_next, pins):
    model = hf_next(pins)
    config = _config(image_grid_pinpoints=pins)
    rng = np.random.default_rng(4)
    newline = rng.standard_normal(16).astype(np.float32)
    sizes = SIZES + [(1280, 720), (720, 1280), (4000, 3000), (1008, 336), (640, 480), (3, 1000)]
    for size in sizes:
        cols, rows = anyres_grid(size, config)
        n = 1 + cols * rows
        feats = rng.standard_normal((n * P * P, 16)).astype(np.float32)
        plan = pack_plan(size, config)
        assert plan.dtype == np.int32 and plan.min() >= -1 and plan.max() < n * P * P
        assert np.array_equal(_apply(plan, feats, newline), _hf_pack(model, feats, size, n, newline)), size
        assert num_image_tokens(size, config) == plan.shape[0]


def test_single_tile_plan_matches_transformers(hf_next):
    """No hr tiles: base rows then one newline, as the official code and transformers do."""
    rng = np.random.default_rng(5)
    feats, newline = rng.standard_normal((P * P, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    plan = anyres_plan((500, 300), None, P)
    assert np.array_equal(plan, np.r_[np.arange(P * P), -1])
    assert np.array_equal(_apply(plan, feats, newline), _hf_pack(hf_next(PINS), feats, (500, 300), 1, newline))


def test_unpad_rounding_follows_official_code(hf_next):
    """704 x 396 on a 2x2 grid: 396 * 48 / 704 = 26.999...; official int() keeps 26 feature rows,
    transformers' int(round(x, 7)) 28."""
    config = _config()
    assert anyres_grid((704, 396), config) == (2, 2)
    plan = pack_plan((704, 396), config)
    assert (plan == -1).sum() == 26 and plan.shape[0] == P * P + 26 * 49
    feats = np.zeros((5 * P * P, 16), np.float32)
    assert _hf_pack(hf_next(PINS), feats, (704, 396), 5, np.zeros(16, np.float32)).shape[0] == P * P + 28 * 49


def test_counts_equal_llava_next_processor(tmp_path):
    from tiny_tokenizer import write_tiny_tokenizer
    from transformers import AutoTokenizer, LlavaNextProcessor
    tok = AutoTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))
    for pins in (PINS, PINS_9, PINS_1X1):
        proc = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=_hw(pins),
                                                                             **CLIP_KW),
                                  tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1)
        config = _config(image_grid_pinpoints=pins)
        for w, h in SIZES + [(1280, 720), (720, 1280), (4000, 3000), (3, 1000)]:
            ref = proc._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0]
            assert num_image_tokens((w, h), config) == ref, (w, h, pins)


def test_flat_plans():
    assert np.array_equal(pack_plan((640, 480), _config(image_aspect_ratio="pad")), np.arange(P * P))
    cls = _config(image_aspect_ratio="square", mm_vision_select_feature="cls_patch")
    assert num_image_tokens((10, 10), cls) == P * P + 1
    assert num_image_tokens((10, 10), _config(image_aspect_ratio="pad", vision_config={**VISION, "image_size": 28,
                                                                                      "patch_size": 14})) == 4


@pytest.mark.parametrize("kw, key", [
    (dict(mm_patch_merge_type="spatial"), "mm_patch_merge_type"),
    (dict(mm_patch_merge_type="flat"), "mm_patch_merge_type"),
    (dict(max_num_patches=9), "max_num_patches"),
    (dict(mm_vision_select_feature="cls_patch"), "mm_vision_select_feature"),
    (dict(image_aspect_ratio="anyres_max_9"), "image_aspect_ratio"),
    (dict(image_grid_pinpoints=[[336, 600]]), "image_grid_pinpoints"),
    (dict(image_grid_pinpoints=None), "image_grid_pinpoints"),
    (dict(vision_config=None), "vision_config"),
    (dict(vision_config={k: v for k, v in VISION.items() if k != "patch_size"}), "patch_size"),
])
def test_unsupported_configs_name_the_key(kw, key):
    with pytest.raises(PmodError, match=key) as e:
        num_image_tokens((500, 400), _config(**kw))
    assert "\n" not in str(e.value)


def test_pinpoints_as_string_and_bad_sizes():
    config = _config(image_grid_pinpoints=str([tuple(p) for p in PINS]))
    assert num_image_tokens((500, 375), config) == num_image_tokens((500, 375), _config())
    for bad in ((0, 5), (5,), "5x5"):
        with pytest.raises(PmodError, match="width, height"):
            pack_plan(bad, _config())
    with pytest.raises(PmodError, match="crop_size"):
        preprocess(_image(20, 20), _config(), ImageProcessorConfig(crop_size=(224, 224)))


# ================================================================ loading
@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "LA", "PA", "P", "P+transparency", "I;16", "I", "F", "L", "1",
                                  "RGB", "RGBA-png", "P+transparency-png", "LA-png", "I;16-png"])
def test_mode_conversion_equals_transformers(mode):
    rng = np.random.default_rng(6)
    base = rng.integers(0, 256, (9, 13, 4), dtype=np.uint8)
    name = mode.split("+")[0].removesuffix("-png")
    if name in ("I;16", "I"):
        im = Image.fromarray(rng.integers(0, 600, (9, 13)).astype(np.uint16 if name == "I;16" else np.int32))
    elif name == "F":
        im = Image.fromarray(rng.uniform(-20, 400, (9, 13)).astype(np.float32))
    elif name in ("P", "PA"):
        im = Image.fromarray(base[..., :3]).convert("P")
        if name == "PA":
            im = im.convert("PA")
    else:
        im = Image.fromarray(base).convert(name) if name != "CMYK" else Image.fromarray(base, "CMYK")
    if "transparency" in mode:
        im.info["transparency"] = int(np.asarray(im)[0, 0])
    if mode.endswith("-png"):
        im = Image.open(io.BytesIO(_encode(im, "PNG")))
    assert im.mode == name
    ref = convert_to_rgb(im, return_numpy=True)
    ours = np.asarray(load_image(im, exif_transpose=False))
    assert ours.dtype == np.uint8 and ours.shape == (9, 13, 3)
    assert np.array_equal(ours, ref)
    assert np.array_equal(np.asarray(load_image(im.copy() if not mode.endswith("-png") else
                                                Image.open(io.BytesIO(_encode(im, "PNG"))))), ref)


def test_alpha_is_composited_on_white():
    im = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(to_rgb(im)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_exif_orientation_like_transformers_load_image(tmp_path):
    from transformers.image_utils import load_image as hf_load
    im = _image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    im.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    ours = load_image(path)
    assert ours.size == (20, 40) and ours.mode == "RGB"
    assert np.array_equal(np.asarray(ours), np.asarray(hf_load(str(path))))
    assert load_image(path.read_bytes()).size == (20, 40)
    assert load_image(path, exif_transpose=False).size == (40, 20)  # the official scripts' view


def test_sources(tmp_path):
    im = _image(30, 17)
    png = _encode(im, "PNG")
    (tmp_path / "a.png").write_bytes(png)
    for src in (tmp_path / "a.png", str(tmp_path / "a.png"), png, bytearray(png), memoryview(png), im):
        out = load_image(src)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(im))


def _error(src, **kw):
    with pytest.raises(PmodError) as e:
        load_image(src, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs(tmp_path):
    im = _image(64, 64)
    assert "not found" in _error(tmp_path / "missing.png")
    assert "not a file" in _error(tmp_path)
    (tmp_path / "notes.txt").write_text("this is not an image\n" * 10)
    assert "not an image" in _error(tmp_path / "notes.txt")
    assert "empty" in _error(b"")
    png, jpg = _encode(im, "PNG"), _encode(im, "JPEG")
    for data in (png[: len(png) // 2], jpg[: len(jpg) // 2], png[:60]):
        assert "truncated or corrupt" in _error(data)
    assert "truncated" in _error(Image.open(io.BytesIO(jpg[: len(jpg) // 2])))  # lazily opened PIL image
    (tmp_path / "cut.jpg").write_bytes(jpg[:-200])
    assert "cut.jpg" in _error(tmp_path / "cut.jpg") and "truncated" in _error(tmp_path / "cut.jpg")
    assert "pixel cap" in _error(_png_with_size(10000, 10000))  # 100 MP header, 69 bytes
    assert "pixel cap" in _error(png, max_pixels=1000)
    assert "too large for Pillow" in _error(_png_with_size(20000, 20000), max_pixels=10 ** 10)
    assert "zero size" in _error(Image.new("RGB", (0, 5)))
    assert "zero-size" in _error(_png_with_size(0, 4))
    assert "int" in _error(123)
    assert load_image(_png_with_size(4, 4)).size == (4, 4)  # the header patch itself is sound
