"""``pmod convert``: an official p-MoD / LLaVA or a llava-hf checkpoint -> a pmod checkpoint directory.

Two source layouts are read, each in its module:

* the original LLaVA layout, as the official code saves it (``pmod.convert.official``):
  ``model_type`` ``pmod_llava_llama``, ``llava_llama`` or ``llama``. These checkpoints
  usually lack the CLIP vision tower (the official code loads it from
  ``mm_vision_tower``): ``vision_tower=CLIP_DIR`` (``pmod convert --vision-tower``) adds a
  Hugging Face ``CLIPVisionModel`` / ``CLIPModel`` directory's tower and vision config
  (``pmod.convert.clip``), so the result is self-contained;
* transformers' llava-hf layout (``pmod.convert.llava_hf``, ``model_type`` ``llava`` /
  ``llava_next``): a dense model with its tower.

Both read the weight files through ``pmod.convert.sources`` and the text model's tensor
names through ``pmod.convert.text_names`` (docs/FORMAT.md has the whole mapping).

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

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from pmod.config import PmodConfig
from pmod.convert.clip import read_clip_tower
from pmod.convert.llava_hf import HF_MODEL_TYPES, hf_llava_config, map_hf_tensors
from pmod.convert.official import MODEL_TYPES, attach_vision_tower, map_tensors, official_config
from pmod.convert.sources import (
    PROCESSOR_FILES, default_dtype, processor_source, read_source_tensors,
)
from pmod.errors import PmodError
from pmod.jsonfile import read_json_object
from pmod.format import FLOAT_DTYPES, TOKENIZER_FILES, atomic_dir, save_checkpoint, stored_dtype, tensor_loaders
from pmod.quantization import DEFAULT_GROUP_SIZE, check_settings, dequantized_loaders, quantized_loaders


def convert_checkpoint(src, dst, dtype: str | None = None, vision_tower=None, quantize: int | None = None,
                       group_size: int | None = None, dequantize: bool = False, quant_ops=None) -> Path:
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
        return _convert_pmod(src, dst, dtype, quantize, group_size, dequantize, vision_tower, quant_ops)
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
        config, span_defaulted = official_config(raw, src)
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
        proc = processor_source(src)
        if proc is not None:
            extra_files["preprocessor_config.json"] = proc
    loaders = {n: t.load for n, t in tensors.items()}
    if quantize is not None:
        config, loaders = quantized_loaders(config, loaders, quantize, group_size, out_dtype, quant_ops)
    _write(dst, config, loaders, out_dtype, src, extra_files)
    return dst


def _is_pmod_checkpoint(src: Path) -> bool:
    try:
        return "pmod_format_version" in json.loads((src / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False  # _read_config_json reports what is wrong


def _convert_pmod(src: Path, dst: Path, dtype, quantize, group_size, dequantize, vision_tower, quant_ops) -> Path:
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
        config, loaders = quantized_loaders(config, loaders, quantize, group_size, out_dtype, quant_ops)
    else:
        config, loaders = dequantized_loaders(config, loaders, quant_ops)
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
    d = read_json_object(path, "re-download the checkpoint")
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


def _progress_bar(total: int, name: str):
    """A tqdm bar over tensors on stderr (None when stderr is not a terminal or no tqdm)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"converting {name}", unit="tensor", file=sys.stderr, leave=False)
