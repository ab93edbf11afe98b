"""``pmod convert``: an official p-MoD / LLaVA checkpoint -> a pmod checkpoint directory.

The source is a Hugging Face directory as the official code saves it (MCG-NJU/p-MoD,
LLaVA): ``config.json`` with ``model_type`` ``pmod_llava_llama`` (or ``llava_llama``
for a dense LLaVA, or plain ``llama``) and the weights as ``model.safetensors``, a
sharded ``model.safetensors.index.json``, ``pytorch_model.bin`` or a sharded
``pytorch_model.bin.index.json``. Official MoD layers are wrappers
(``model.layers.N.decoder_layer.*`` plus ``model.layers.N.router.router.*``); pmod names
every layer alike plus ``router.*`` (see docs/FORMAT.md for the whole mapping).

Everything that can be checked before writing is checked first (config, files, tensor
names, the set of MoD layers against the schedule, shapes), so bad input raises one
``PmodError`` and creates nothing; the write itself is atomic (``format.atomic_dir``).
Tensors stream one at a time from memory-mapped sources, so a 7B bfloat16 checkpoint
converts without holding the model twice. Only the ``.bin`` path imports torch.
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .config import _DECAY_RE, PmodConfig
from .errors import PmodError
from .format import FLOAT_DTYPES, TOKENIZER_FILES, expected_tensors, save_checkpoint
from .safetensors_io import read_header, read_tensors, to_float32
from .schedule import mod_layers

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

#: model_type values pmod convert reads (all use the original LLaVA tensor layout).
MODEL_TYPES = ("pmod_llava_llama", "llava_llama", "llama")
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
def convert_checkpoint(src, dst, dtype: str | None = None) -> Path:
    """Convert the official checkpoint directory ``src`` into the pmod directory ``dst``.

    ``dtype`` (float16, bfloat16, float32) is the weight dtype on disk; by default the
    source's (bfloat16 stays bfloat16, float16 stays float16, float32 becomes float16).
    Returns ``dst``. Raises :class:`PmodError` (and writes nothing) on bad input.
    """
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise PmodError(f"unknown dtype {dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}")
    if dst.exists():
        raise PmodError(f"output {dst} already exists; remove it or choose another path")
    config, span_defaulted = _read_official_config(src)
    source = read_source_tensors(src)
    tensors = map_tensors(source, config, src, span_defaulted)
    out_dtype = dtype or default_dtype(tensors.values())
    if not any((src / f).is_file() for f in TOKENIZER_FILES if f != "generation_config.json"):
        print(f"pmod: warning: {src} has no tokenizer files; the converted model will need one "
              "(copy tokenizer.model / tokenizer.json and tokenizer_config.json into it)", file=sys.stderr)
    bar = _progress_bar(len(tensors), dst.name)
    try:
        save_checkpoint(dst, config, {n: t.load for n, t in tensors.items()}, dtype=out_dtype,
                        tokenizer_dir=src, progress=(lambda _name: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    return dst


# ------------------------------------------------------------------------------ config
def read_official_config(src: Path) -> PmodConfig:
    """The :class:`PmodConfig` of an official checkpoint directory (with its defaults)."""
    return _read_official_config(src)[0]


def _read_official_config(src: Path) -> tuple[PmodConfig, bool]:
    """(config, whether the official ``mod_decay_span`` = 31 was supplied)."""
    src = Path(src)
    if not src.exists():
        raise PmodError(f"source checkpoint {src} does not exist")
    if not src.is_dir():
        raise PmodError(f"source {src} is not a directory: pass the checkpoint directory that holds config.json")
    path = src / "config.json"
    if not path.is_file():
        raise PmodError(f"{src} has no config.json: not a Hugging Face checkpoint directory")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PmodError(f"{path} is not valid JSON ({_first_line(e)}); re-download the checkpoint") from None
    except OSError as e:
        raise PmodError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(d, dict):
        raise PmodError(f"{path} must hold a JSON object; re-download the checkpoint")
    if "pmod_format_version" in d:
        raise PmodError(f"{src} is already a pmod checkpoint: use it directly, no conversion needed")
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        what = f"model_type {model_type!r}" if "model_type" in d else "no 'model_type'"
        raise PmodError(
            f"{path} has {what}: pmod convert reads 'pmod_llava_llama' (p-MoD), "
            "'llava_llama' (LLaVA) and 'llama' checkpoints in the original LLaVA layout")
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
def vision_tower_name(official: str) -> str | None:
    """The pmod name of a vision-tower tensor (``model.vision_tower.*``), or None to drop it.

    The vision tower is not converted yet: every one of its tensors is dropped here.
    This is the single place where the CLIP tower will be mapped in.
    """
    return None


def pmod_name(official: str, config: PmodConfig) -> str | None:
    """The pmod name of one official tensor; None for a tensor pmod drops.

    Raises PmodError for a name that belongs to no known part of the model.
    """
    if official.endswith("rotary_emb.inv_freq"):
        return None  # a buffer recomputed from rope_theta
    if official.startswith("model.vision_tower."):
        return vision_tower_name(official)
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
                span_defaulted: bool = False) -> dict[str, _Tensor]:
    """Rename the source tensors to pmod names and check them against the config."""
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

    expected = expected_tensors(config)
    for new, t in mapped.items():
        if new not in expected:
            raise PmodError(
                f"unexpected tensor '{t.name}' in {t.file.name}: config.json does not call for it "
                "(attention_bias, mlp_bias, mod_bias_enabled, mm_patch_merge_type?)")
    missing = [n for n in expected if n not in mapped]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        name = official_name(missing[0], set(wrapped), config.mm_projector_type)
        raise PmodError(f"tensor '{name}'{more} is missing from {src}; download the complete checkpoint")
    for new, t in mapped.items():
        if t.shape != expected[new]:
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
    return pmod


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
