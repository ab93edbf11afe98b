"""Image loading, CLIP preprocessing and LLaVA(-NeXT) feature packing, for every backend.

Pixels: ``preprocess(image, config)`` gives float32 ``pixel_values [n, 3, S, S]`` equal to
``transformers``' PIL-backend image processors (``CLIPImageProcessorPil``,
``LlavaImageProcessorPil``, ``LlavaNextImageProcessorPil``) and to the official LLaVA /
p-MoD ``process_images``: resizing is Pillow's (bicubic, no ``reducing_gap``), the short side
is ``int(size * long / short)``, rescale is done in float64 then cast, normalisation in float32.

Packing: a runtime encodes the ``n`` tiles to features ``[n, T, D]`` and gathers them with
``ImageInput.plan`` (int32 indices into the ``n * T`` flattened rows; ``-1`` = the learned
``image_newline`` vector). The rule (official ``llava_arch``): LLaVA-1.5 keeps the one
tile's rows; LLaVA-NeXT ``anyres`` + ``spatial_unpad`` puts the base tile's rows first, then
the high-resolution tiles as one feature map, cropped back to the image's aspect ratio, with
a newline after every row.

Conventions: sizes are ``(width, height)`` like PIL's, grids are ``(cols, rows)``, and
``image_grid_pinpoints`` are ``[width, height]`` pairs as the official code reads them
(``transformers`` reads the same list as ``[height, width]``; the two differ only on ties,
see ``select_best_resolution``).
"""

from __future__ import annotations

import ast
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pmod.config import PmodConfig, VisionConfig
from pmod.errors import PmodError
from pmod.jsonfile import read_json_object

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the CLIP processors' resample
DEFAULT_MAX_PIXELS = 64_000_000
NEWLINE = -1  # plan entry: the learned image_newline vector
PREPROCESSOR_FILE = "preprocessor_config.json"
_PRE = "preprocessor key"
# preprocessor_config.json image_processor_type values whose do_pad means "pad to square
# with the mean colour"; LlavaNextImageProcessor's do_pad pads a batch's tile counts instead.
_PAD_TO_SQUARE_TYPES = ("LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


# ===================================================================== loading
def load_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               exif_transpose: bool = True) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes or a PIL image; bad input is a PmodError.

    ``max_pixels`` caps width * height before anything is decoded (decompression bombs).
    ``exif_transpose`` applies the EXIF orientation tag, as ``transformers.image_utils.load_image``
    does; the official LLaVA scripts (``Image.open(f).convert('RGB')``) do not, so pass False
    to reproduce them on rotated photos. Transparency is composited on white, greyscale and
    CMYK converted (``to_rgb``).
    """
    if isinstance(src, Image.Image):
        name = "the given PIL image"
        _check_size(src.size, name, max_pixels)
        try:
            src.load()  # a lazily opened image decodes here
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise PmodError(f"{name} could not be decoded, it is truncated or corrupt ({_one_line(e)}): "
                            "re-export or re-download it") from None
        return _finish(src, name, exif_transpose)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        name = f"image bytes ({len(data)} B)"
        if not data:
            raise PmodError("image bytes are empty: pass the encoded file's content (PNG, JPEG, ...)")
        return _decode(io.BytesIO(data), name, max_pixels, exif_transpose)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise PmodError(f"image file {path} not found: check the path")
        if not path.is_file():
            raise PmodError(f"image path {path} is not a file: pass an image file")
        try:
            with open(path, "rb") as fp:
                return _decode(fp, f"image file {path}", max_pixels, exif_transpose)
        except PermissionError:
            raise PmodError(f"image file {path} is not readable: check its permissions") from None
    raise PmodError(f"cannot load an image from a {type(src).__name__}: pass a path, bytes or a PIL image")


def _decode(fp, name: str, max_pixels: int, exif_transpose: bool) -> Image.Image:
    # pmod enforces its own pixel cap (checked before decoding), so Pillow's bomb warning is
    # silenced; Pillow's hard DecompressionBombError (2x its limit) is still reported.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as im:
                _check_size(im.size, name, max_pixels)
                im.load()
                return _finish(im, name, exif_transpose)
        except PmodError:
            raise
        except Image.DecompressionBombError as e:
            raise PmodError(f"{name} is too large for Pillow ({e}); raise PIL.Image.MAX_IMAGE_PIXELS "
                            "if you trust it") from None
        except UnidentifiedImageError:
            raise PmodError(f"{name} is not an image Pillow can read (unknown format, or "
                            "a zero-size image): pass a non-empty PNG, JPEG, WebP, ... file") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
            raise PmodError(f"{name} could not be decoded, it is truncated or corrupt ({_one_line(e)}): "
                            "re-export or re-download it") from None


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise PmodError(f"{name} has zero size ({w}x{h}): pass a non-empty image")
    if w * h > max_pixels:
        raise PmodError(f"{name} is {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel cap "
                        "(decompression bomb?): downscale it or raise max_pixels")


def _finish(im: Image.Image, name: str, exif_transpose: bool) -> Image.Image:
    if exif_transpose:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - malformed EXIF is metadata, no reason to reject the pixels
            pass
    try:
        return to_rgb(im)
    except (OSError, ValueError) as e:
        raise PmodError(f"{name} in mode {im.mode!r} could not be converted to RGB ({_one_line(e)}): "
                        "convert it to RGB first") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (``transformers.image_transforms.convert_to_rgb``).

    The official LLaVA scripts call ``convert('RGB')``, which drops alpha and shows whatever
    colour lies under transparent pixels; ``transformers`` composites on white, and so do we.
    Greyscale of more than 8 bits (I;16, I, F) is clipped to 0..255 by Pillow, as in both.
    """
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


# ============================================================ processor config
@dataclass(frozen=True)
class ImageProcessorConfig:
    """The CLIP image processor's settings (``preprocessor_config.json``).

    ``size``: an int resizes the shortest edge to it (aspect kept), a ``(height, width)``
    pair resizes to exactly that, None skips resizing. ``crop_size``: ``(height, width)`` of
    the center crop, None skips it. ``do_pad``: LLaVA-1.5's pad-to-square with the mean
    colour (llava-hf ``LlavaImageProcessor``); ``image_aspect_ratio: pad`` asks for the same.
    ``do_rescale: false`` reads as ``rescale_factor = 1``, ``do_normalize: false`` as mean 0, std 1.
    """

    size: int | tuple[int, int] | None = 336
    crop_size: tuple[int, int] | None = (336, 336)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: int = BICUBIC
    rescale_factor: float = 1 / 255
    do_pad: bool = False

    @classmethod
    def from_vision_config(cls, vision_config: VisionConfig | None) -> "ImageProcessorConfig":
        """CLIP defaults at the tower's ``image_size`` (openai/clip-vit-large-patch14-336 at 336)."""
        s = _image_size(vision_config)
        return cls(size=s, crop_size=(s, s))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        """From a ``preprocessor_config.json`` object (CLIP, LLaVA or LLaVA-NeXT processors)."""
        kind = str(d.get("image_processor_type") or d.get("feature_extractor_type") or "")
        size = _size_value(d.get("size", 336), "size") if d.get("do_resize", True) else None
        crop = _crop_value(d.get("crop_size", size)) if d.get("do_center_crop", True) else None
        mean, std = (_triple(d, "image_mean", CLIP_MEAN), _triple(d, "image_std", CLIP_STD))
        if not d.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if any(s <= 0 for s in std):
            raise PmodError(f"preprocessor key 'image_std' must be positive, got {list(std)}")
        factor = _number(d.get("rescale_factor", 1 / 255), "rescale_factor") if d.get("do_rescale", True) else 1.0
        resample = d.get("resample", BICUBIC)
        if not isinstance(resample, int) or isinstance(resample, bool) or resample not in range(6):
            raise PmodError(f"preprocessor key 'resample' must be a PIL filter number 0..5, got {resample!r}")
        do_pad = bool(d.get("do_pad", False)) and kind in _PAD_TO_SQUARE_TYPES
        return cls(size=size, crop_size=crop, image_mean=mean, image_std=std, resample=resample,
                   rescale_factor=factor, do_pad=do_pad)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ImageProcessorConfig":
        path = Path(path)
        if path.is_dir():
            path = path / PREPROCESSOR_FILE
        return cls.from_dict(read_json_object(
            path, missing="not found: pass a preprocessor_config.json or a model directory"))

    @classmethod
    def for_model(cls, config: PmodConfig, directory: str | os.PathLike | None = None) -> "ImageProcessorConfig":
        """The model directory's ``preprocessor_config.json`` if it has one, else CLIP defaults."""
        if directory is not None and (Path(directory) / PREPROCESSOR_FILE).is_file():
            return cls.from_file(Path(directory) / PREPROCESSOR_FILE)
        return cls.from_vision_config(config.vision_config)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """LLaVA's ``expand2square`` fill: the mean colour, truncated to 0..255 integers."""
        return tuple(int(x * 255) for x in self.image_mean)


def _size_value(v, key: str) -> int | tuple[int, int]:
    if isinstance(v, dict):
        if "shortest_edge" in v:
            return _positive_int(v["shortest_edge"], key, _PRE)
        if "height" in v and "width" in v:
            return _positive_int(v["height"], key, _PRE), _positive_int(v["width"], key, _PRE)
        raise PmodError(f"preprocessor key '{key}' {v!r} is not supported: use shortest_edge or height+width")
    return _positive_int(v, key, _PRE)


def _crop_value(v) -> tuple[int, int]:
    if v is None:
        raise PmodError("preprocessor key 'crop_size' is missing while do_center_crop is true")
    v = _size_value(v, "crop_size")
    return v if isinstance(v, tuple) else (v, v)


def _triple(d: dict, key: str, default) -> tuple[float, float, float]:
    v = d.get(key, default)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v] * 3
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise PmodError(f"preprocessor key '{key}' must be 3 numbers (R, G, B), got {v!r}")
    return tuple(_number(x, key) for x in v)


def _number(v, key: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise PmodError(f"preprocessor key '{key}' must be a number, got {v!r}")
    return float(v)


def _positive_int(v, key: str, where: str = "config key") -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise PmodError(f"{where} '{key}' must be a positive integer, got {v!r}")
    return v


# ===================================================================== CLIP pixels
def resize_shortest_edge(size_wh: tuple[int, int], shortest: int) -> tuple[int, int]:
    """(width, height) with the short side ``shortest``, the long side ``int(shortest * long / short)``.

    ``transformers.image_transforms.get_resize_output_image_size`` (torchvision's rule):
    truncation, not rounding.
    """
    w, h = size_wh
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(shortest * long / short)
    return (shortest, new_long) if w <= h else (new_long, shortest)


def center_crop(pixels: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """Center crop of an ``[H, W, C]`` array; an image smaller than the crop is padded with 0
    (placed at ``ceil`` of half the shortfall), as ``transformers.image_transforms.center_crop``."""
    H, W = pixels.shape[:2]
    ch, cw = crop_hw
    if ch > H or cw > W:
        nh, nw = max(ch, H), max(cw, W)
        top_pad, left_pad = -(-(nh - H) // 2), -(-(nw - W) // 2)
        canvas = np.zeros((nh, nw) + pixels.shape[2:], dtype=pixels.dtype)
        canvas[top_pad:top_pad + H, left_pad:left_pad + W] = pixels
        top, left = (H - ch) // 2 + top_pad, (W - cw) // 2 + left_pad
        pixels, H, W = canvas, nh, nw
    else:
        top, left = (H - ch) // 2, (W - cw) // 2
    return pixels[max(0, top):min(H, top + ch), max(0, left):min(W, left + cw)]


def clip_pixels(image: Image.Image, proc: ImageProcessorConfig) -> np.ndarray:
    """``CLIPImageProcessor`` on one RGB image: resize, center crop, rescale, normalise -> ``[3, h, w]`` float32."""
    if proc.size is not None:
        w, h = (resize_shortest_edge(image.size, proc.size) if isinstance(proc.size, int)
                else (proc.size[1], proc.size[0]))
        image = image.resize((w, h), resample=proc.resample)
    pixels = np.asarray(image, dtype=np.uint8)
    if proc.crop_size is not None:
        pixels = center_crop(pixels, proc.crop_size)
    x = (pixels.astype(np.float64) * proc.rescale_factor).astype(np.float32)
    x = (x - np.asarray(proc.image_mean, np.float32)) / np.asarray(proc.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``expand2square``: the image centered on a square of colour ``fill``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


# ===================================================================== anyres pixels
def select_best_resolution(size_wh: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint ``(width, height)`` that keeps the most of the image, then wastes the least.

    Effective resolution: the image's pixels after an aspect-preserving fit (never more than
    it has); waste: the pinpoint's area minus that. Ties keep the earliest pinpoint: this is
    where the official code (pairs read as width, height) and ``transformers`` (height,
    width) differ on the same list, e.g. for a small image ``[336, 672]`` is one column of
    two tiles officially and one row of two in ``transformers``.
    """
    w, h = size_wh
    best, best_effective, best_waste = None, 0, float("inf")
    for pw, ph in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (pw, ph), effective, waste
    return best


def resize_and_pad(image: Image.Image, target_wh: tuple[int, int], resample: int = BICUBIC) -> Image.Image:
    """Aspect-preserving resize into ``target_wh`` (the fitted side ``ceil``-ed), centered on black.

    Official ``resize_and_pad_image`` and transformers' ``_resize_for_patching`` +
    ``_pad_for_patching`` agree: same sizes, same offsets (odd remainder after), black 0.
    """
    w, h = image.size
    tw, th = target_wh
    sw, sh = tw / w, th / h
    if sw < sh:
        nw, nh = tw, min(math.ceil(h * sw), th)
    else:
        nw, nh = min(math.ceil(w * sh), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), resample=resample), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def split_tiles(image: Image.Image, tile: int) -> list[Image.Image]:
    """Tiles of ``tile x tile`` in row-major order (``divide_to_patches``)."""
    w, h = image.size
    return [image.crop((x, y, x + tile, y + tile)) for y in range(0, h, tile) for x in range(0, w, tile)]


def anyres_pixels(image: Image.Image, proc: ImageProcessorConfig, pinpoints: list[tuple[int, int]],
                  tile: int) -> tuple[np.ndarray, tuple[int, int]]:
    """LLaVA-NeXT ``process_anyres_image``: ``([1 + cols*rows, 3, S, S], (cols, rows))``.

    Tile 0 is the base view, the whole image squashed to the processor's size; then the
    best-fit pinpoint's tiles, row-major. Each tile then goes through ``clip_pixels``.
    """
    bw, bh = select_best_resolution(image.size, pinpoints)
    tiles = split_tiles(resize_and_pad(image, (bw, bh), proc.resample), tile)
    base = image.resize(_base_wh(proc), resample=proc.resample)
    pixels = np.stack([clip_pixels(t, proc) for t in [base] + tiles])
    return pixels, (bw // tile, bh // tile)


def _base_wh(proc: ImageProcessorConfig) -> tuple[int, int]:
    if proc.size is None:
        raise PmodError("preprocessor key 'do_resize' is false: LLaVA-NeXT anyres needs a resize size")
    return (proc.size, proc.size) if isinstance(proc.size, int) else (proc.size[1], proc.size[0])


# ===================================================================== packing plans
def flat_plan(tokens_per_tile: int) -> np.ndarray:
    """LLaVA-1.5: the one tile's feature rows in order."""
    return np.arange(tokens_per_tile, dtype=np.int32)


def unpad_bounds(original_wh: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the official ``unpad_image`` on a ``height x width`` map.

    The side that was padded is cut by ``(current - int(original * scale)) // 2`` at both
    ends. transformers' ``unpad_image`` computes ``int(round(original * scale, 7))``, which
    differs when float error leaves the product just under an integer: for a 704 x 396 image
    on a 2 x 2 grid (48 x 48 patches) 396 * 48 / 704 = 26.999..., the official code keeps 26
    rows, transformers 28. We follow the official code, which p-MoD was trained with.
    """
    ow, oh = original_wh
    if ow / oh > width / height:
        new_h = int(oh * (width / ow))
        pad = (height - new_h) // 2
        return pad, height - pad, 0, width
    new_w = int(ow * (height / oh))
    pad = (width - new_w) // 2
    return 0, height, pad, width - pad


def anyres_plan(original_wh: tuple[int, int], grid: tuple[int, int] | None, patches_per_side: int) -> np.ndarray:
    """LLaVA-NeXT ``spatial_unpad``: base rows, then the unpadded high-res map with a newline per row.

    Feature row ``t * P*P + y * P + x`` is patch ``(y, x)`` of tile ``t`` (tile 0 the base,
    tiles ``1 + r * cols + c`` the grid). ``grid=None`` (base tile only) gives the base rows
    and one newline, as the official code does for a single-tile input.
    """
    P = patches_per_side
    base = np.arange(P * P, dtype=np.int32)
    if grid is None:
        return np.concatenate([base, np.array([NEWLINE], np.int32)])
    cols, rows = grid
    top, bottom, left, right = unpad_bounds(original_wh, rows * P, cols * P)
    Y, X = np.meshgrid(np.arange(top, bottom), np.arange(left, right), indexing="ij")
    tile = 1 + (Y // P) * cols + X // P
    hr = tile * (P * P) + (Y % P) * P + X % P
    hr = np.concatenate([hr, np.full((hr.shape[0], 1), NEWLINE)], axis=1)
    return np.concatenate([base, hr.reshape(-1).astype(np.int32)])


# ===================================================================== model-level rules
@dataclass(frozen=True, eq=False)
class ImageInput:
    """One preprocessed image: pixels for the vision tower and how to pack its features.

    ``plan`` indexes the ``pixel_values.shape[0] * T`` flattened feature rows (``T`` =
    ``tokens_per_tile``); ``-1`` is ``image_newline``. ``base_tokens``: the leading plan entries
    from an anyres image's base view, which official p-MoD leaves unrouted under
    ``mod_target_token_type='vision_hr'`` (0 for LLaVA-1.5: all its image tokens are routed).
    """

    pixel_values: np.ndarray  # [n_tiles, 3, S, S] float32
    original_size: tuple[int, int]  # (width, height)
    grid: tuple[int, int] | None  # (cols, rows) of high-res tiles; None for LLaVA-1.5
    plan: np.ndarray  # int32 [num_tokens]
    base_tokens: int
    tokens_per_tile: int

    @property
    def num_tokens(self) -> int:
        return int(self.plan.shape[0])

    def feature_index(self, offset: int = 0, newline_row: int | None = None) -> np.ndarray:
        """The plan as rows of ``concat(features.reshape(-1, H), image_newline[None])``.

        Every runtime packs an image with this one gather: -1 becomes the appended newline
        row. With several images in one feature matrix, ``offset`` is the row of this
        image's first tile and ``newline_row`` the row of the shared newline vector.
        """
        n_rows = self.pixel_values.shape[0] * self.tokens_per_tile
        newline = n_rows + offset if newline_row is None else newline_row
        return np.where(self.plan < 0, newline, self.plan + offset).astype(np.int32)

    def routed_mask(self, token_type: str = "vision_hr") -> np.ndarray:
        """Which image tokens are MoD vision tokens (official ``mod_target_mask``)."""
        mask = np.ones(self.num_tokens, dtype=bool)
        if token_type == "vision_hr":
            mask[:self.base_tokens] = False
        return mask


def layout(config: PmodConfig) -> str:
    """'anyres' (LLaVA-NeXT), 'pad' or 'square' (LLaVA-1.5), checking the keys anyres needs."""
    aspect = config.image_aspect_ratio or "square"
    if aspect == "anyres":
        merge = config.mm_patch_merge_type or "flat"
        if merge != "spatial_unpad":
            raise PmodError(f"config key 'mm_patch_merge_type' = {merge!r} is not supported with anyres: "
                            "p-MoD's LLaVA-NeXT uses 'spatial_unpad'")
        if config.max_num_patches is not None:
            raise PmodError(f"config key 'max_num_patches' = {config.max_num_patches!r} (bilinear "
                            "down-sampling of the feature map) is not supported: set it to null")
        if config.mm_vision_select_feature != "patch":
            raise PmodError(f"config key 'mm_vision_select_feature' = {config.mm_vision_select_feature!r} "
                            "is not supported with anyres: use 'patch'")
        return "anyres"
    if aspect.startswith("anyres"):
        raise PmodError(f"config key 'image_aspect_ratio' = {aspect!r} is not supported: use 'anyres' "
                        "with 'image_grid_pinpoints'")
    return "pad" if aspect == "pad" else "square"


def patches_per_side(config: PmodConfig) -> int:
    """``P = image_size // patch_size`` of the vision tower (24 for CLIP ViT-L/14 at 336)."""
    size = _image_size(config.vision_config)
    patch = config.vision_config.patch_size
    if size % patch:
        raise PmodError(f"config key 'vision_config.image_size' ({size}) must be a multiple of 'patch_size' ({patch})")
    return size // patch


def tokens_per_tile(config: PmodConfig) -> int:
    """Feature rows the vision tower gives per tile: ``P*P``, plus the CLS row for 'cls_patch'."""
    return patches_per_side(config) ** 2 + (config.mm_vision_select_feature == "cls_patch")


def grid_pinpoints(config: PmodConfig) -> list[tuple[int, int]]:
    """``image_grid_pinpoints`` as ``(width, height)`` pairs, each a multiple of the tile size."""
    raw = config.image_grid_pinpoints
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raw = None
    tile = _image_size(config.vision_config)
    ok = isinstance(raw, (list, tuple)) and len(raw) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 and x % tile == 0 for x in p)
        for p in raw)
    if not ok:
        raise PmodError(f"config key 'image_grid_pinpoints' must be a list of [width, height] pairs, "
                        f"multiples of the tile size {tile}, got {config.image_grid_pinpoints!r}")
    return [(int(p[0]), int(p[1])) for p in raw]


def anyres_grid(original_wh: tuple[int, int], config: PmodConfig) -> tuple[int, int]:
    """``(cols, rows)`` of high-res tiles for an image of ``original_wh`` (no pixels needed)."""
    tile = _image_size(config.vision_config)
    bw, bh = select_best_resolution(original_wh, grid_pinpoints(config))
    return bw // tile, bh // tile


def pack_plan(original_wh: tuple[int, int], config: PmodConfig) -> np.ndarray:
    """The feature-gather plan for an image of ``original_wh`` under ``config`` (see ``ImageInput``)."""
    _check_wh(original_wh)
    if layout(config) == "anyres":
        return anyres_plan(original_wh, anyres_grid(original_wh, config), patches_per_side(config))
    return flat_plan(tokens_per_tile(config))


def num_image_tokens(original_wh: tuple[int, int], config: PmodConfig) -> int:
    """Embedding slots an image of ``original_wh`` takes in the prompt (newlines included)."""
    return int(pack_plan(original_wh, config).shape[0])


def preprocess(image: ImageSource, config: PmodConfig, processor: ImageProcessorConfig | None = None, *,
               max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = True) -> ImageInput:
    """Load ``image`` and preprocess it for ``config`` (LLaVA-1.5 'pad'/'square' or NeXT 'anyres').

    ``processor`` defaults to CLIP settings at the tower's image size.
    """
    proc = processor or ImageProcessorConfig.from_vision_config(config.vision_config)
    kind = layout(config)
    im = load_image(image, max_pixels=max_pixels, exif_transpose=exif_transpose)
    size = im.size
    if kind == "anyres":
        tile = _image_size(config.vision_config)
        if proc.crop_size != (tile, tile):
            raise PmodError(f"preprocessor 'crop_size' {proc.crop_size} must be the vision tower's "
                            f"image_size ({tile}, {tile}) for anyres")
        pixels, grid = anyres_pixels(im, proc, grid_pinpoints(config), tile)
        plan = anyres_plan(size, grid, patches_per_side(config))
        base = patches_per_side(config) ** 2
    else:
        if kind == "pad" or proc.do_pad:
            im = expand_to_square(im, proc.pad_color)
        pixels, grid, plan, base = clip_pixels(im, proc)[None], None, flat_plan(tokens_per_tile(config)), 0
    return ImageInput(pixel_values=pixels, original_size=size, grid=grid, plan=plan,
                      base_tokens=base, tokens_per_tile=tokens_per_tile(config))


def _image_size(vision_config: VisionConfig | None) -> int:
    if vision_config is None:
        raise PmodError("config has no 'vision_config': this model takes no images")
    return vision_config.image_size


def _check_wh(wh) -> None:
    if (not isinstance(wh, (tuple, list)) or len(wh) != 2
            or not all(isinstance(x, (int, np.integer)) and x > 0 for x in wh)):
        raise PmodError(f"image size must be (width, height) positive integers, got {wh!r}")
