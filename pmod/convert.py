"""``pmod convert``: an official p-MoD / LLaVA or a llava-hf checkpoint -> a pmod checkpoint directory.

Two source layouts are read:

* the original LLaVA layout, as the official code saves it (MCG-NJU/p-MoD, LLaVA):
  ``config.json`` with ``model_type`` ``pmod_llava_llama`` (or ``llava_llama`` for a dense
  LLaVA, or plain ``llama``). Official MoD layers are wrappers
  (``model.layers.N.decoder_layer.*`` plus ``model.layers.N.router.router.*``); pmod names
  every layer alike plus ``router.*``. These checkpoints usually lack the CLIP vision
  tower (the official code loads it from ``mm_vision_tower``): ``vision_tower=CLIP_DIR``
  (``pmod convert --vision-tower``) adds a Hugging Face ``CLIPVisionModel`` / ``CLIPModel``
  directory's tower and vision config, so the result is self-contained;
* transformers' llava-hf layout (``LlavaForConditionalGeneration`` /
  ``LlavaNextForConditionalGeneration.save_pretrained``, ``model_type`` ``llava`` /
  ``llava_next``, transformers 4 and 5 tensor names): a dense model with its tower.

The weights are ``model.safetensors``, a sharded ``model.safetensors.index.json``,
``pytorch_model.bin`` or a sharded ``pytorch_model.bin.index.json`` (see docs/FORMAT.md
for the whole mapping).

``quantize`` (``pmod convert --quantize 4|8``) writes a quantized checkpoint
(``pmod.quantization``) from either source or from a float pmod checkpoint;
``dequantize`` writes a quantized pmod checkpoint's float copy.

Everything that can be checked before writing is checked first (config, files, tensor
names, the set of MoD layers against the schedule, shapes, the tower against the
checkpoint), so bad input raises one ``PmodError`` and creates nothing; the write itself
is atomic (``format.atomic_dir``). Tensors stream one at a time from memory-mapped
sources, so a 7B bfloat16 checkpoint converts without holding the model twice. Only the
``.bin`` path imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .config import _DECAY_RE, PmodConfig
from .errors import PmodError
from .format import (
    FLOAT_DTYPES, TOKENIZER_FILES, atomic_dir, expected_tensors, save_checkpoint, stored_dtype, tensor_loaders,
    vision_layers_used, vision_tensors,
)
from .quantization import DEFAULT_GROUP_SIZE, check_settings, dequantized_loaders, quantized_loaders
from .safetensors_io import read_header, read_tensors, to_float32
from .schedule import mod_layers

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

#: model_type values pmod convert reads in the original LLaVA tensor layout.
MODEL_TYPES = ("pmod_llava_llama", "llava_llama", "llama")
#: model_type values of transformers' llava-hf layout (LLaVA-1.5, LLaVA-NeXT).
HF_MODEL_TYPES = ("llava", "llava_next")
#: Image-processor files copied next to the tokenizer files (the first is what
#: ``pmod.image`` reads; transformers 5 saves only the second, with an ``image_processor``).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
#: The official code computes the shifted-cosine/linear schedule with a fixed D = 31.
OFFICIAL_DECAY_SPAN = 31

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PROJECTOR_RE = re.compile(r"^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$")
_TOP_LEVEL = {
    "model.embed_tokens.weight": "language_model.embed_tokens.weight",
    "model.norm.weight": "language_model.norm.weight",
    "lm_head.weight": "language_model.lm_head.weight",
    "model.image_newline": "image_newline",
}
_FLOAT_ST = ("F32", "F16", "BF16", "F64")
_ST_TO_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float16", "F64": "float16"}


@dataclass
class _Tensor:
    """One source tensor: where it lives, its shape and dtype, and how to read it."""

    name: str          # official name
    file: Path
    shape: tuple[int, ...]
    dtype: str         # safetensors dtype name (F32, F16, BF16, ...)
    load: Callable[[], np.ndarray]


# --------------------------------------------------------------------------- entry point
def convert_checkpoint(src, dst, dtype: str | None = None, vision_tower=None, quantize: int | None = None,
                       group_size: int | None = None, dequantize: bool = False) -> Path:
    """Convert the checkpoint directory ``src`` into the pmod directory ``dst``.

    ``src``: an official p-MoD / LLaVA checkpoint or a llava-hf one (``model_type``
    ``llava`` / ``llava_next``, converted into a dense pmod model with its tower).
    ``dtype`` (float16, bfloat16, float32) is the weight dtype on disk; by default the
    source's (bfloat16 stays bfloat16, float16 stays float16, float32 becomes float16).
    ``vision_tower``: a Hugging Face ``CLIPVisionModel`` or ``CLIPModel`` directory whose
    vision tower and config go into ``dst`` (official layout only; llava-hf checkpoints
    carry their own). ``quantize`` (4 or 8 bits, ``group_size`` 32, 64 or 128, default 64):
    MLX affine quantization (``pmod.quantization``; needs MLX); ``src`` may then also be a
    float pmod checkpoint. ``dequantize``: ``src`` is a quantized pmod checkpoint, ``dst``
    its float copy. Returns ``dst``. Raises :class:`PmodError` (and writes nothing) on bad
    input.
    """
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise PmodError(f"unknown dtype {dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}")
    if quantize is None and group_size is not None:
        raise PmodError("--group-size goes with --quantize 4|8")
    if quantize is not None:
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        check_settings(quantize, group_size)
        if dequantize:
            raise PmodError("--quantize and --dequantize exclude each other: give one")
    if dst.exists():
        raise PmodError(f"output {dst} already exists; remove it or choose another path")
    if _is_pmod_checkpoint(src):
        return _convert_pmod(src, dst, dtype, quantize, group_size, dequantize, vision_tower)
    if dequantize:
        raise PmodError(f"--dequantize takes a quantized pmod checkpoint; {src} is not a pmod checkpoint")
    raw = _read_config_json(src)
    extra_files: dict[str, Path | dict] = {}
    if raw.get("model_type") in HF_MODEL_TYPES:
        if vision_tower is not None:
            raise PmodError(
                f"{src} is a llava-hf checkpoint (model_type {raw['model_type']!r}) and carries its own "
                f"vision tower: drop --vision-tower {vision_tower}")
        config = hf_llava_config(raw, src)
        tensors = map_hf_tensors(read_source_tensors(src), config, src)
    else:
        config, span_defaulted = _official_config(raw, src)
        source = read_source_tensors(src)
        clip = read_clip_tower(vision_tower) if vision_tower is not None else None
        config, source, tower_src = attach_vision_tower(config, source, src, clip)
        tensors = map_tensors(source, config, src, span_defaulted, tower_src=tower_src)
        if clip is not None and not any((src / f).is_file() for f in PROCESSOR_FILES):
            # the official code preprocesses with the tower's own image processor
            proc = clip.processor()
            if proc is not None:
                extra_files["preprocessor_config.json"] = proc
    out_dtype = dtype or default_dtype(tensors.values())
    if not any((src / f).is_file() for f in TOKENIZER_FILES if f != "generation_config.json"):
        print(f"pmod: warning: {src} has no tokenizer files; the converted model will need one "
              "(copy tokenizer.model / tokenizer.json and tokenizer_config.json into it)", file=sys.stderr)
    for name in PROCESSOR_FILES:
        if (src / name).is_file():
            extra_files.setdefault(name, src / name)
    if "preprocessor_config.json" not in extra_files:
        # transformers 5 keeps the image processor inside processor_config.json only;
        # pmod.image reads preprocessor_config.json
        proc = _processor_source(src)
        if proc is not None:
            extra_files["preprocessor_config.json"] = proc
    loaders = {n: t.load for n, t in tensors.items()}
    if quantize is not None:
        config, loaders = quantized_loaders(config, loaders, quantize, group_size, out_dtype)
    _write(dst, config, loaders, out_dtype, src, extra_files)
    return dst


def _is_pmod_checkpoint(src: Path) -> bool:
    try:
        return "pmod_format_version" in json.loads((src / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False  # _read_config_json reports what is wrong


def _convert_pmod(src: Path, dst: Path, dtype, quantize, group_size, dequantize, vision_tower) -> Path:
    """``--quantize`` or ``--dequantize`` of a pmod checkpoint; anything else needs no conversion."""
    if quantize is None and not dequantize:
        raise PmodError(f"{src} is already a pmod checkpoint: use it directly, no conversion needed "
                        "(--quantize 4|8 quantizes it, --dequantize makes a quantized one float)")
    if vision_tower is not None:
        raise PmodError(f"{src} is a pmod checkpoint: drop --vision-tower (it adds a tower to official checkpoints)")
    config, found, loaders = tensor_loaders(src)
    q = config.quant
    if quantize is not None and q is not None:
        raise PmodError(f"{src} is already quantized ({q.bits}-bit): quantize its float checkpoint instead "
                        "(or --dequantize it first)")
    if dequantize and q is None:
        raise PmodError(f"{src} is not quantized: --dequantize takes a checkpoint written with --quantize")
    out_dtype = dtype or stored_dtype(found)
    if quantize is not None:
        config, loaders = quantized_loaders(config, loaders, quantize, group_size, out_dtype)
    else:
        config, loaders = dequantized_loaders(config, loaders)
    _write(dst, config, loaders, out_dtype, src, {})
    return dst


def _write(dst: Path, config: PmodConfig, loaders: dict[str, Callable[[], np.ndarray]], dtype: str, src: Path,
           extra_files: dict[str, "Path | dict"]) -> None:
    """``save_checkpoint`` plus the processor files, all in one atomic step."""
    bar = _progress_bar(len(loaders), dst.name)
    try:
        with atomic_dir(dst) as tmp:
            inner = tmp / "checkpoint"
            save_checkpoint(inner, config, loaders, dtype=dtype,
                            tokenizer_dir=src, progress=(lambda _name: bar.update(1)) if bar else None)
            for path in inner.iterdir():
                os.replace(path, tmp / path.name)
            inner.rmdir()
            for name, what in extra_files.items():
                if (tmp / name).exists():
                    continue  # already copied with the tokenizer files
                if isinstance(what, dict):
                    (tmp / name).write_text(json.dumps(what, indent=2) + "\n")
                else:
                    shutil.copy2(what, tmp / name)
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------ config
def read_official_config(src: Path) -> PmodConfig:
    """The :class:`PmodConfig` of an official checkpoint directory (with its defaults)."""
    return _read_official_config(src)[0]


def _read_official_config(src: Path) -> tuple[PmodConfig, bool]:
    """(config, whether the official ``mod_decay_span`` = 31 was supplied); llava-hf sources too."""
    d = _read_config_json(src)
    if d.get("model_type") in HF_MODEL_TYPES:
        return hf_llava_config(d, Path(src)), False
    return _official_config(d, Path(src))


def _read_config_json(src: Path) -> dict:
    """The source's config.json as a dict, with a known ``model_type``."""
    src = Path(src)
    if not src.exists():
        raise PmodError(f"source checkpoint {src} does not exist")
    if not src.is_dir():
        raise PmodError(f"source {src} is not a directory: pass the checkpoint directory that holds config.json")
    path = src / "config.json"
    if not path.is_file():
        raise PmodError(f"{src} has no config.json: not a Hugging Face checkpoint directory")
    d = _read_json_object(path, "re-download the checkpoint")
    if "pmod_format_version" in d:
        raise PmodError(f"{src} is already a pmod checkpoint: use it directly, no conversion needed")
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES + HF_MODEL_TYPES:
        what = f"model_type {model_type!r}" if "model_type" in d else "no 'model_type'"
        raise PmodError(
            f"{path} has {what}: pmod convert reads 'pmod_llava_llama' (p-MoD), "
            "'llava_llama' (LLaVA) and 'llama' checkpoints in the original LLaVA layout, and "
            "'llava' / 'llava_next' (transformers' llava-hf layout)")
    return d


def _read_json_object(path: Path, fix: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PmodError(f"{path} is not valid JSON ({_first_line(e)}); {fix}") from None
    except OSError as e:
        raise PmodError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(d, dict):
        raise PmodError(f"{path} must hold a JSON object; {fix}")
    return d


def _official_config(d: dict, src: Path) -> tuple[PmodConfig, bool]:
    path = Path(src) / "config.json"
    d = dict(d)
    spec = d.get("mod_target_layers")
    span_defaulted = isinstance(spec, str) and bool(_DECAY_RE.match(spec)) and d.get("mod_decay_span") is None
    if span_defaulted:
        d["mod_decay_span"] = OFFICIAL_DECAY_SPAN
    if d.get("mm_vision_tower") is not None and d.get("mm_projector_type") is None:
        d["mm_projector_type"] = "linear"  # LLaVA's default when the key is absent
    try:
        return PmodConfig.from_dict(d), span_defaulted
    except PmodError as e:
        raise PmodError(f"{path}: {e}") from None


def default_dtype(tensors) -> str:
    """The source's dtype (by element count); float32 sources become float16."""
    count: dict[str, int] = {}
    for t in tensors:
        count[t.dtype] = count.get(t.dtype, 0) + int(np.prod(t.shape, dtype=np.int64))
    if not count:
        return "float16"
    return _ST_TO_DTYPE.get(max(count, key=count.get), "float16")


# ---------------------------------------------------------------------- weight files
def read_source_tensors(src: Path) -> dict[str, _Tensor]:
    """Every tensor of the checkpoint's weight files, memory-mapped, by official name."""
    src = Path(src)
    if (src / SAFETENSORS_INDEX).is_file():
        files, claims = _read_index(src, SAFETENSORS_INDEX)
        reader = _safetensors_tensors
    elif (src / SAFETENSORS_FILE).is_file():
        files, claims, reader = [src / SAFETENSORS_FILE], None, _safetensors_tensors
    elif (src / BIN_INDEX).is_file():
        files, claims = _read_index(src, BIN_INDEX)
        reader = _torch_tensors
    elif (src / BIN_FILE).is_file():
        files, claims, reader = [src / BIN_FILE], None, _torch_tensors
    else:
        raise PmodError(
            f"{src} holds no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} "
            f"or {BIN_INDEX}; download the weight files too")
    out: dict[str, _Tensor] = {}
    for f in files:
        for name, t in reader(f).items():
            if name in out:
                raise PmodError(f"tensor '{name}' appears in two files ({out[name].file.name}, {f.name}); "
                                "re-download the checkpoint")
            out[name] = t
    if claims is not None:
        index = claims.pop("__index__")
        for name, fname in claims.items():
            if name not in out or out[name].file.name != fname:
                raise PmodError(f"tensor '{name}' is listed in {index} under {fname} but that file does not "
                                "hold it; re-download the checkpoint")
    return out


def _read_index(src: Path, index_name: str) -> tuple[list[Path], dict[str, str]]:
    index = src / index_name
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise PmodError(f"{index} is corrupt (no valid 'weight_map'); re-download the checkpoint") from None
    files = []
    root = src.resolve()
    for fname in sorted(set(weight_map.values())):
        path = src / fname
        if root not in path.resolve().parents:
            raise PmodError(f"{index} names shard {fname!r} outside {src}; re-download the checkpoint")
        if not path.is_file():
            raise PmodError(f"{path} is missing (listed in {index_name}); download every shard of the checkpoint")
        files.append(path)
    return files, {**weight_map, "__index__": index_name}


def _safetensors_tensors(path: Path) -> dict[str, _Tensor]:
    header = read_header(path)  # checks the header and that every tensor lies inside the file
    arrays = read_tensors(path)  # memory maps: nothing is read until a tensor is loaded
    out = {}
    for name, info in header.items():
        out[name] = _Tensor(name, path, tuple(info["shape"]), info["dtype"],
                            _numpy_loader(arrays[name], info["dtype"]))
    return out


def _numpy_loader(arr: np.ndarray, st_dtype: str) -> Callable[[], np.ndarray]:
    # F16/F32 go through untouched (a memory map); BF16 bits are widened to float32.
    if st_dtype in ("BF16", "F64"):
        return lambda: to_float32(arr, st_dtype)
    return lambda: arr


_TORCH_ST = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64"}


def _torch_tensors(path: Path) -> dict[str, _Tensor]:
    try:
        import torch
    except ImportError:
        raise PmodError(
            f"{path.name} is a PyTorch pickle and reading it needs torch: pip install torch "
            "(or convert the checkpoint to safetensors first)") from None
    try:
        # Zip-format files (torch >= 1.6) are memory-mapped; legacy ones cannot be.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many types for corrupt files
        raise PmodError(
            f"{path}: cannot load the PyTorch checkpoint ({type(e).__name__}: {_first_sentence(e)}); it is "
            "corrupt, truncated or holds more than tensors (loaded with weights_only=True): re-download it "
            "or convert it to safetensors") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise PmodError(f"{path} does not hold a state dict of named tensors; re-save it with "
                        "model.save_pretrained()")
    out = {}
    for name, t in state.items():
        st = _TORCH_ST.get(str(t.dtype), str(t.dtype).replace("torch.", ""))
        out[name] = _Tensor(name, path, tuple(t.shape), st, _torch_loader(t))
    return out


def _torch_loader(t) -> Callable[[], np.ndarray]:
    def load():
        import torch

        x = t.detach()
        if x.dtype in (torch.bfloat16, torch.float64):
            x = x.float()
        return x.numpy()
    return load


# ------------------------------------------------------------------------- name mapping
#: Where LLaVA's ``CLIPVisionTower`` keeps the CLIP model in an official state dict.
OFFICIAL_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
#: A CLIP vision tensor name inside the tower (after any ``vision_model.`` prefix).
_CLIP_PART_RE = re.compile(r"^(?:embeddings|encoder|pre_layrnorm|post_layernorm)\.")


def vision_tower_name(official: str, config: PmodConfig | None = None) -> str | None:
    """The pmod name of an official vision-tower tensor (``model.vision_tower.*``), or None to drop it.

    Kept only when ``config`` has a ``vision_config`` (from ``--vision-tower``): then
    ``model.vision_tower.vision_tower.vision_model.<rest>`` becomes ``vision_tower.<rest>``,
    except what LLaVA never runs (see :func:`tower_tensor_name`).
    """
    if config is None or config.vision_config is None or not official.startswith(OFFICIAL_TOWER_PREFIX):
        return None
    return tower_tensor_name(official[len(OFFICIAL_TOWER_PREFIX):], config)


def tower_tensor_name(rest: str, config: PmodConfig) -> str | None:
    """``vision_tower.<rest>`` for a ``CLIPVisionModel`` tensor ``<rest>`` (no ``vision_model.``),
    or None for what LLaVA never runs: ``post_layernorm``, encoder layers past
    ``mm_vision_select_layer``, the ``position_ids`` buffer."""
    if rest.startswith("post_layernorm.") or rest.endswith("position_ids"):
        return None
    m = re.match(r"^encoder\.layers\.(\d+)\.", rest)
    if m and int(m.group(1)) >= vision_layers_used(config):
        return None
    return "vision_tower." + rest


def pmod_name(official: str, config: PmodConfig) -> str | None:
    """The pmod name of one official tensor; None for a tensor pmod drops.

    Raises PmodError for a name that belongs to no known part of the model.
    """
    if official.endswith("rotary_emb.inv_freq"):
        return None  # a buffer recomputed from rope_theta
    if official.startswith("model.vision_tower."):
        return vision_tower_name(official, config)
    if official == "lm_head.weight" and config.tie_word_embeddings:
        return None  # tied: the embeddings are the output projection
    if official in _TOP_LEVEL:
        return _TOP_LEVEL[official]
    m = _LAYER_RE.match(official)
    if m:
        idx, rest = int(m.group(1)), m.group(2)
        if rest.startswith("decoder_layer."):
            return f"language_model.layers.{idx}.{rest[len('decoder_layer.'):]}"
        if rest.startswith("router.router."):
            return f"language_model.layers.{idx}.router.{rest[len('router.router.'):]}"
        if not rest.startswith("router."):
            return f"language_model.layers.{idx}.{rest}"
    m = _PROJECTOR_RE.match(official)
    if m:
        slot = {"linear": {None: 1}, "mlp2x_gelu": {"0": 1, "2": 2}}.get(config.mm_projector_type, {})
        if m.group(1) in slot:
            return f"projector.linear_{slot[m.group(1)]}.{m.group(2)}"
    hint = f" (mm_projector_type {config.mm_projector_type!r})" if official.startswith("model.mm_projector") else ""
    raise PmodError(f"unknown tensor '{official}': not part of a p-MoD / LLaVA LLaMA model with this "
                    f"config.json{hint}; is this the right checkpoint?")


def map_tensors(source: dict[str, _Tensor], config: PmodConfig, src: Path | str = "",
                span_defaulted: bool = False, tower_src: Path | str | None = None) -> dict[str, _Tensor]:
    """Rename the source tensors to pmod names and check them against the config.

    ``tower_src``: where the vision tower's tensors come from (for messages; default ``src``).
    """
    L = config.num_hidden_layers
    mapped: dict[str, _Tensor] = {}
    wrapped: dict[int, str] = {}
    plain: dict[int, str] = {}
    for name, t in source.items():
        new = pmod_name(name, config)
        if new is None:
            continue
        m = _LAYER_RE.match(name)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if idx >= L:
                raise PmodError(f"tensor '{name}' belongs to layer {idx} but config.json has "
                                f"num_hidden_layers = {L}; is this the right config.json?")
            kind = wrapped if rest.startswith(("decoder_layer.", "router.")) else plain
            kind.setdefault(idx, name)
        mapped[new] = t
    both = sorted(set(wrapped) & set(plain))
    if both:
        i = both[0]
        raise PmodError(f"layer {i} has both wrapped ('{wrapped[i]}') and plain ('{plain[i]}') tensor "
                        "names; the checkpoint is inconsistent: re-download it")
    _check_mod_layers(set(wrapped), config, src, span_defaulted)
    return _checked(mapped, config, src, lambda n: official_name(n, set(wrapped), config.mm_projector_type),
                    tower_src)


def _checked(mapped: dict[str, _Tensor], config: PmodConfig, src, source_name: Callable[[str], str],
             tower_src=None) -> dict[str, _Tensor]:
    """``mapped`` (pmod name -> source tensor) in file order, once it is exactly what the
    config calls for (names, shapes, float dtypes). ``source_name`` gives a missing tensor's
    source name."""
    expected = expected_tensors(config)
    for new, t in mapped.items():
        if new not in expected:
            hint = ("vision_config, mm_vision_select_layer?" if new.startswith("vision_tower.")
                    else "attention_bias, mlp_bias, mod_bias_enabled, mm_patch_merge_type?")
            raise PmodError(
                f"unexpected tensor '{t.name}' in {t.file.name}: config.json does not call for it ({hint})")
    missing = [n for n in expected if n not in mapped]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        if missing[0].startswith("vision_tower.") and tower_src is not None and Path(tower_src) != Path(src):
            raise PmodError(
                f"vision tower tensor '{missing[0][len('vision_tower.'):]}'{more} is missing from {tower_src}; "
                "pass a complete CLIP vision tower (config.json and all its weight files)")
        raise PmodError(f"tensor '{source_name(missing[0])}'{more} is missing from {src}; "
                        "download the complete checkpoint")
    for new, t in mapped.items():
        if t.shape != expected[new]:
            if new.startswith("vision_tower."):
                v = config.vision_config
                raise PmodError(
                    f"tensor '{t.name}' in {t.file} has shape {t.shape}, expected {expected[new]} from the "
                    f"vision config (hidden_size {v.get('hidden_size')}, intermediate_size "
                    f"{v.get('intermediate_size')}, image_size {v.get('image_size')}, patch_size "
                    f"{v.get('patch_size')}); the vision tower's weights and config do not match")
            raise PmodError(f"tensor '{t.name}' in {t.file.name} has shape {t.shape}, expected "
                            f"{expected[new]} from config.json; is this the right config.json?")
        if t.dtype not in _FLOAT_ST:
            raise PmodError(f"tensor '{t.name}' in {t.file.name} has dtype {t.dtype}; expected a float dtype")
    return {n: mapped[n] for n in expected}


def _check_mod_layers(wrapped: set[int], config: PmodConfig, src, span_defaulted: bool = False) -> None:
    routed = set(mod_layers(config))
    if wrapped == routed:
        return
    parts = []
    extra = sorted(wrapped - routed)
    lacking = sorted(routed - wrapped)
    one = len(extra) == 1
    if extra and config.is_mod:
        parts.append(f"{_layers(extra)} {'has' if one else 'have'} routers but the schedule "
                     f"{config.mod_target_layers!r} makes {'it' if one else 'them'} dense")
    elif extra:
        parts.append(f"{_layers(extra)} {'has' if one else 'have'} routers but config.json has no "
                     "'mod_target_layers' (a dense model)")
    if lacking:
        one = len(lacking) == 1
        parts.append(f"{_layers(lacking)} {'lacks' if one else 'lack'} routers but the schedule "
                     f"{config.mod_target_layers!r} routes {'it' if one else 'them'}")
    keys = f"mod_target_layers = {config.mod_target_layers!r}"
    if config.is_mod:
        keys += f", mod_router_factor = {config.mod_router_factor}"
        if config.mod_decay_span:
            keys += f", mod_decay_span = {config.mod_decay_span}" + (
                " (the official default; config.json sets none)" if span_defaulted else "")
    keys += f", num_hidden_layers = {config.num_hidden_layers}"
    raise PmodError(
        f"MoD layers of {src or 'the checkpoint'} do not match config.json: " + "; ".join(parts)
        + f". Schedule keys: {keys}; fix them in config.json or use the config.json that came with these weights")


def _layers(idx: list[int]) -> str:
    return ("layer " if len(idx) == 1 else "layers ") + ", ".join(map(str, idx))


def official_name(pmod: str, wrapped: set[int], projector_type: str | None = "mlp2x_gelu") -> str:
    """The official name of a pmod tensor (for messages and docs)."""
    for k, v in _TOP_LEVEL.items():
        if v == pmod:
            return k
    m = re.match(r"^language_model\.layers\.(\d+)\.(.+)$", pmod)
    if m:
        idx, rest = int(m.group(1)), m.group(2)
        if rest.startswith("router."):
            return f"model.layers.{idx}.router.{rest}"
        return f"model.layers.{idx}.decoder_layer.{rest}" if idx in wrapped else f"model.layers.{idx}.{rest}"
    m = re.match(r"^projector\.linear_(\d)\.(weight|bias)$", pmod)
    if m:
        if projector_type == "linear":
            return f"model.mm_projector.{m.group(2)}"
        return f"model.mm_projector.{2 * (int(m.group(1)) - 1)}.{m.group(2)}"
    if pmod.startswith("vision_tower."):
        return OFFICIAL_TOWER_PREFIX + pmod[len("vision_tower."):]
    return pmod


# ------------------------------------------------------------------------- vision tower
#: transformers' CLIPVisionConfig defaults (a key absent from a config.json takes these); a pmod
#: ``vision_config`` holds exactly these keys plus ``model_type``.
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)


def clip_vision_config(v: dict, where: str) -> dict:
    """A complete pmod ``vision_config`` from a CLIP vision config dict (defaults filled in).

    ``where`` names the source in messages. Only CLIP (``clip_vision_model``) is accepted.
    """
    if not isinstance(v, dict):
        raise PmodError(f"{where} must be a JSON object, got {type(v).__name__}")
    kind = v.get("model_type", "clip_vision_model")
    if kind != "clip_vision_model":
        raise PmodError(f"{where} has model_type {kind!r}: pmod's vision tower is CLIP ('clip_vision_model')")
    out = {"model_type": "clip_vision_model"}
    for key, default in CLIP_VISION_DEFAULTS.items():
        out[key] = default if v.get(key) is None else v[key]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_channels", "image_size", "patch_size"):
        x = out[key]
        if not isinstance(x, int) or isinstance(x, bool) or x <= 0:
            raise PmodError(f"{where}: '{key}' must be a positive integer, got {x!r}")
    if out["image_size"] % out["patch_size"]:
        raise PmodError(f"{where}: image_size {out['image_size']} is not a multiple of patch_size "
                        f"{out['patch_size']}; LLaVA's CLIP towers use e.g. 336 / 14")
    if out["hidden_size"] % out["num_attention_heads"]:
        raise PmodError(f"{where}: num_attention_heads {out['num_attention_heads']} does not divide "
                        f"hidden_size {out['hidden_size']}")
    if not isinstance(out["layer_norm_eps"], (int, float)) or out["layer_norm_eps"] <= 0:
        raise PmodError(f"{where}: 'layer_norm_eps' must be a positive number, got {out['layer_norm_eps']!r}")
    return out


@dataclass
class ClipTower:
    """A Hugging Face CLIP directory given with ``--vision-tower``: its vision config now,
    its weights (headers only, memory-mapped) when asked."""

    path: Path
    vision_config: dict

    def tensors(self) -> dict[str, _Tensor]:
        """The tower's tensors by ``CLIPVisionModel`` name without ``vision_model.``."""
        out: dict[str, _Tensor] = {}
        for name, t in read_source_tensors(self.path).items():
            rest = name[len("vision_model."):] if name.startswith("vision_model.") else name
            if _CLIP_PART_RE.match(rest):
                out[rest] = t
        if not out:
            raise PmodError(
                f"vision tower {self.path} holds no CLIP vision tensors (vision_model.embeddings.*, "
                "vision_model.encoder.layers.*): pass a CLIPVisionModel or CLIPModel directory")
        return out

    def processor(self) -> "Path | dict | None":
        """Its image processor config: the preprocessor_config.json file, else processor_config.json's
        ``image_processor`` object, else None."""
        return _processor_source(self.path)


def read_clip_tower(path) -> ClipTower:
    """Read a ``CLIPVisionModel`` / ``CLIPModel`` directory's config (weights are read later)."""
    path = Path(path)
    if not path.exists():
        raise PmodError(f"vision tower {path} does not exist: pass a Hugging Face CLIP directory "
                        "(e.g. a download of openai/clip-vit-large-patch14-336)")
    if not path.is_dir():
        raise PmodError(f"vision tower {path} is not a directory: pass the Hugging Face CLIP directory "
                        "that holds config.json and the weights")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise PmodError(f"vision tower {path} has no config.json: pass a Hugging Face CLIPVisionModel or "
                        "CLIPModel directory (e.g. a download of openai/clip-vit-large-patch14-336)")
    d = _read_json_object(cfg, "re-download the vision tower")
    kind = d.get("model_type")
    if kind == "clip":  # a full CLIPModel: the tower's keys are nested (old configs: *_dict too)
        v = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        return ClipTower(path, clip_vision_config({**v, "model_type": "clip_vision_model"}, f"{cfg} vision_config"))
    if kind == "clip_vision_model":
        return ClipTower(path, clip_vision_config(d, str(cfg)))
    what = f"model_type {kind!r}" if "model_type" in d else "no 'model_type'"
    raise PmodError(f"vision tower {cfg} has {what}: --vision-tower takes a CLIP tower "
                    "(a CLIPVisionModel or CLIPModel directory, model_type 'clip_vision_model' or 'clip')")


def attach_vision_tower(config: PmodConfig, source: dict[str, _Tensor], src: Path,
                        clip: ClipTower | None) -> tuple[PmodConfig, dict[str, _Tensor], Path]:
    """The official checkpoint's config and tensors with the vision tower settled.

    Without ``clip`` the checkpoint's own tower tensors (if any) are dropped, unless its
    config has a ``vision_config``. With ``clip``, the config gets the CLIP's vision config
    (checked against the checkpoint: width, select layer, anyres grid), and the tower's
    weights are the checkpoint's own when it holds them all (a LLaVA trained with
    ``unfreeze_mm_vision_tower``), else the CLIP directory's.
    Returns (config, source tensors, where the tower's weights come from).
    """
    tower = {n for n in source if n.startswith("model.vision_tower.")}
    # the CLIP the checkpoint was trained with, as its config.json names it
    clip_dir = (f"CLIP_DIR (a download of {config.mm_vision_tower})" if config.mm_vision_tower
                else "CLIP_DIR (the CLIP it was trained with)")
    if clip is None:
        if config.vision_config is None and config.mm_projector_type is not None:
            if tower:
                print(f"pmod: warning: {src} holds {len(tower)} vision-tower tensors but no vision config: "
                      f"they are dropped; to keep the tower, convert with --vision-tower {clip_dir}, for "
                      "its config.json", file=sys.stderr)
            else:
                print(f"pmod: warning: {src} has no vision tower: the converted model takes no images; "
                      f"convert with --vision-tower {clip_dir} to include it",
                      file=sys.stderr)
        return config, source, src
    if config.mm_projector_type is None:
        raise PmodError(f"{src} is a text-only model (its config.json has no mm_projector_type): "
                        f"--vision-tower {clip.path} has no use; drop it")
    v = clip.vision_config
    cfg = f"{src / 'config.json'}"
    if v["hidden_size"] != config.mm_hidden_size:
        raise PmodError(
            f"vision tower {clip.path} has hidden_size {v['hidden_size']} but {cfg} has mm_hidden_size "
            f"{config.mm_hidden_size} (the projector's input width): pass the CLIP tower the checkpoint "
            f"was trained with" + (f" ({config.mm_vision_tower})" if config.mm_vision_tower else ""))
    config = dataclasses.replace(config, vision_config=dict(v))
    _check_tower_fits(config, f"vision tower {clip.path}", cfg)
    needed = set(vision_tensors(config))
    own = {vision_tower_name(n, config) for n in tower} - {None}
    if needed <= own:
        return config, source, src  # the checkpoint's own (fine-tuned) tower; CLIP gives its config
    if own:
        print(f"pmod: warning: {src} holds only {len(own & needed)} of the {len(needed)} vision-tower "
              f"tensors the model needs: they are ignored, the tower comes from {clip.path}", file=sys.stderr)
    out = {n: t for n, t in source.items() if n not in tower}
    for rest, t in clip.tensors().items():
        out[OFFICIAL_TOWER_PREFIX + rest] = t
    return config, out, clip.path


def _check_tower_fits(config: PmodConfig, tower: str, cfg: str, shown_pins=None) -> None:
    """The tower's layers cover ``mm_vision_select_layer``; anyres tiles are whole tower images.

    ``shown_pins``: the pinpoints as the source config writes them (for the message)."""
    v = config.vision_config
    try:
        vision_layers_used(config)
    except PmodError:
        raise PmodError(
            f"{cfg} has mm_vision_select_layer = {config.mm_vision_select_layer} but {tower} has only "
            f"{v['num_hidden_layers']} layers: is this the right tower?") from None
    pins = config.image_grid_pinpoints
    if (config.image_aspect_ratio or "").startswith("anyres") and isinstance(pins, list):
        size = v["image_size"]
        bad = [p for p in pins if not (isinstance(p, (list, tuple)) and all(
            isinstance(x, int) and x > 0 and x % size == 0 for x in p))]
        if bad:
            raise PmodError(
                f"{cfg} has image_grid_pinpoints {shown_pins or pins} but {tower} has image_size {size}: the anyres "
                f"resolutions (e.g. {list(bad[0]) if isinstance(bad[0], (list, tuple)) else bad[0]}) must be "
                "multiples of the tower's image size; is this the right tower?")


def read_image_processor(path: Path) -> dict | None:
    """A directory's image-processor settings: ``preprocessor_config.json``, else the
    ``image_processor`` of ``processor_config.json`` (transformers 5), else None."""
    found = _processor_source(path)
    return _read_json_object(found, "re-download it") if isinstance(found, Path) else found


def _processor_source(path: Path) -> "Path | dict | None":
    """The ``preprocessor_config.json`` file, else processor_config.json's ``image_processor``."""
    path = Path(path)
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        return pre
    proc = path / "processor_config.json"
    if proc.is_file():
        inner = _read_json_object(proc, "re-download it").get("image_processor")
        if isinstance(inner, dict):
            return inner
    return None


# ---------------------------------------------------------------------------- llava-hf
#: transformers' LlamaConfig defaults (llava-hf text_configs often omit keys at their default).
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      hidden_act="silu", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
#: LlavaConfig's tower when config.json has no vision_config (CLIP ViT-L/14 at 336).
LLAVA_VISION_DEFAULT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14)
#: LlavaNextConfig's default image_grid_pinpoints ([height, width] as transformers reads them).
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_SELECT_STRATEGY = {"default": "patch", "full": "cls_patch"}

_HF_TEXT_RE = re.compile(r"^((?:model\.)?language_model\.(?:model\.)?)((?:embed_tokens|layers|norm)\..+)$")
_HF_TOWER_RE = re.compile(r"^((?:model\.)?vision_tower\.(?:vision_model\.)?)(.+)$")
_HF_PROJECTOR_RE = re.compile(r"^((?:model\.)?multi_modal_projector\.)linear_([12])\.(weight|bias)$")
_HF_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight")
_HF_NEWLINE = ("image_newline", "model.image_newline")


def hf_llava_config(d: dict, src: Path) -> PmodConfig:
    """The dense :class:`PmodConfig` of a llava-hf ``config.json`` (``llava`` / ``llava_next``)."""
    src = Path(src)
    path = src / "config.json"
    model_type = d["model_type"]
    text = d.get("text_config")
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise PmodError(f"{path}: 'text_config' must be an object")
    text_type = text.get("model_type", "llama")
    if text_type != "llama":
        raise PmodError(f"{path} has text_config model_type {text_type!r}: pmod runs LLaMA decoders "
                        "(llava-hf checkpoints built on Vicuna / LLaMA, text_config model_type 'llama')")
    t = {**LLAMA_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k == "pad_token_id"}}
    for key in ("pad_token_id", "tie_word_embeddings"):  # older configs keep these at the top level
        if key not in text and d.get(key) is not None:
            t[key] = d[key]
    vraw = d.get("vision_config")
    where = f"{path} vision_config"
    vision = clip_vision_config({**LLAVA_VISION_DEFAULT, "model_type": "clip_vision_model"} if vraw is None
                                else vraw, where)

    layer = d.get("vision_feature_layer", -2)
    if isinstance(layer, (list, tuple)):
        raise PmodError(f"{path} has vision_feature_layer = {list(layer)} (features of several layers, "
                        "concatenated): not supported, pmod takes the features of one layer (an int)")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise PmodError(f"{path}: vision_feature_layer must be an integer, got {layer!r}")
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in _SELECT_STRATEGY:
        raise PmodError(f"{path} has vision_feature_select_strategy {strategy!r}: expected 'default' "
                        "(patch features, CLS dropped) or 'full'")
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise PmodError(f"{path} has projector_hidden_act {act!r}: pmod's projector is LLaVA's mlp2x_gelu "
                        "(Linear, exact GELU 'gelu', Linear)")
    if d.get("multimodal_projector_bias", True) is not True:
        raise PmodError(f"{path} has multimodal_projector_bias = {d.get('multimodal_projector_bias')!r}: "
                        "pmod's mlp2x_gelu projector has biases (multimodal_projector_bias true)")

    processor = read_image_processor(src)
    if model_type == "llava_next":
        pins = d.get("image_grid_pinpoints", LLAVA_NEXT_PINPOINTS)
        if not (isinstance(pins, list) and pins and all(
                isinstance(p, (list, tuple)) and len(p) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in p) for p in pins)):
            raise PmodError(f"{path}: image_grid_pinpoints must be a list of [height, width] pairs, got {pins!r}")
        proc_pins = processor.get("image_grid_pinpoints") if processor else None
        if proc_pins is not None and [list(p) for p in proc_pins] != [list(p) for p in pins]:
            raise PmodError(f"{path} has image_grid_pinpoints {pins} but the image processor config has "
                            f"{proc_pins}: they must agree (pmod uses one list for tiling and packing)")
        mm = dict(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                  # transformers reads a pinpoint as [height, width], the official code (and pmod)
                  # as [width, height]: swapped, the same resolutions in the same order
                  image_grid_pinpoints=[[int(p[1]), int(p[0])] for p in pins])
    else:
        # LlavaImageProcessor's do_pad is LLaVA-1.5's pad-to-square (LlavaNext's means another thing)
        pad = bool(processor and processor.get("do_pad") and
                   str(processor.get("image_processor_type", "")).startswith("LlavaImageProcessor"))
        if processor is None:
            print(f"pmod: warning: {src} has no preprocessor_config.json (or processor_config.json): "
                  "images will be resized and center-cropped (image_aspect_ratio 'square'); official "
                  "LLaVA-1.5 pads them to a square (set image_aspect_ratio to 'pad' in the converted "
                  "config.json for that)", file=sys.stderr)
        mm = dict(image_aspect_ratio="pad" if pad else "square", mm_patch_merge_type="flat",
                  image_grid_pinpoints=None)
    cfg = {
        **t, **mm,
        "mod_target_layers": None, "mod_decay_span": None,
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": vision["hidden_size"],
        "mm_vision_select_layer": layer, "mm_vision_select_feature": _SELECT_STRATEGY[strategy],
        "mm_vision_tower": None, "vision_config": vision,
        "mm_use_im_start_end": False,
    }
    try:
        config = PmodConfig.from_dict(cfg)
    except PmodError as e:
        raise PmodError(f"{path}: {e}") from None
    try:
        vision_layers_used(config)
    except PmodError:
        raise PmodError(f"{path} has vision_feature_layer = {layer} but its vision tower has "
                        f"{vision['num_hidden_layers']} layers") from None
    if model_type == "llava_next":
        _check_tower_fits(config, "its vision_config", str(path), shown_pins=pins)
    return config


def hf_pmod_name(name: str, config: PmodConfig) -> str | None:
    """The pmod name of one llava-hf tensor (transformers 4 or 5 naming); None to drop it."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _HF_LM_HEAD:
        return None if config.tie_word_embeddings else "language_model.lm_head.weight"
    if name in _HF_NEWLINE:
        return "image_newline"
    m = _HF_TEXT_RE.match(name)
    if m:
        return "language_model." + m.group(2)
    m = _HF_PROJECTOR_RE.match(name)
    if m:
        return f"projector.linear_{m.group(2)}.{m.group(3)}"
    m = _HF_TOWER_RE.match(name)
    if m and _CLIP_PART_RE.match(m.group(2)):
        return tower_tensor_name(m.group(2), config)
    raise PmodError(f"unknown tensor '{name}': not part of a llava-hf LLaVA / LLaVA-NeXT model with a "
                    "LLaMA decoder and a CLIP tower; is this the right checkpoint?")


def map_hf_tensors(source: dict[str, _Tensor], config: PmodConfig, src: Path | str = "") -> dict[str, _Tensor]:
    """Rename a llava-hf checkpoint's tensors to pmod names and check them against the config."""
    L = config.num_hidden_layers
    mapped: dict[str, _Tensor] = {}
    for name, t in source.items():
        new = hf_pmod_name(name, config)
        if new is None:
            continue
        m = re.match(r"^language_model\.layers\.(\d+)\.", new)
        if m and int(m.group(1)) >= L:
            raise PmodError(f"tensor '{name}' belongs to layer {m.group(1)} but config.json has "
                            f"text_config num_hidden_layers = {L}; is this the right config.json?")
        if new in mapped:
            raise PmodError(f"tensors '{mapped[new].name}' and '{name}' are the same weight under two "
                            "naming schemes; re-save the checkpoint")
        mapped[new] = t
    return _checked(mapped, config, src, _hf_namer(source))


def _hf_namer(source) -> Callable[[str], str]:
    """pmod name -> the llava-hf name in the naming scheme the source uses (for messages)."""
    def prefix(regex, default):
        return next((m.group(1) for n in source if (m := regex.match(n))), default)
    text = prefix(_HF_TEXT_RE, "model.language_model.")
    top = "model." if text.startswith("model.") else ""
    tower = prefix(_HF_TOWER_RE, top + "vision_tower.")

    def name(pmod: str) -> str:
        if pmod == "language_model.lm_head.weight":
            return "lm_head.weight" if top else "language_model.lm_head.weight"
        if pmod.startswith("language_model."):
            return text + pmod[len("language_model."):]
        if pmod.startswith("projector."):
            return top + "multi_modal_projector." + pmod[len("projector."):]
        if pmod.startswith("vision_tower."):
            return tower + pmod[len("vision_tower."):]
        return top + pmod
    return name


# ------------------------------------------------------------------------------ helpers
def _first_sentence(e: BaseException, limit: int = 120) -> str:
    line = _first_line(e, limit)
    return re.split(r"(?<=[a-z)])\. ", line, maxsplit=1)[0].rstrip(".")


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _progress_bar(total: int, name: str):
    """A tqdm bar over tensors on stderr (None when stderr is not a terminal or no tqdm)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"converting {name}", unit="tensor", file=sys.stderr, leave=False)
