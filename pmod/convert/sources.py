"""Reading a source checkpoint directory: its weight files, JSON files and image processor.

The weights are ``model.safetensors``, a sharded ``model.safetensors.index.json``,
``pytorch_model.bin`` or a sharded ``pytorch_model.bin.index.json``. Every tensor becomes
a :class:`SourceTensor` whose data is read only when loaded (safetensors are
memory-mapped, zip-format ``.bin`` files too), so a converter can check names, shapes and
dtypes of a 7B checkpoint before reading any of it. Only the ``.bin`` path imports torch.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pmod.errors import PmodError, first_line
from pmod.jsonfile import read_json_object
from pmod.safetensors_io import read_header, read_tensors, to_float32

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
#: Image-processor files copied next to the tokenizer files (the first is what
#: ``pmod.image`` reads; transformers 5 saves only the second, with an ``image_processor``).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

#: The float source dtypes (safetensors names) and the pmod dtype each is written as by default.
_DEFAULT_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float16", "F64": "float16"}
FLOAT_SOURCE_DTYPES = tuple(_DEFAULT_DTYPE)
_TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64"}


@dataclass
class SourceTensor:
    """One source tensor: where it lives, its shape and dtype, and how to read it."""

    name: str          # its name in the source
    file: Path
    shape: tuple[int, ...]
    dtype: str         # safetensors dtype name (F32, F16, BF16, ...)
    load: Callable[[], np.ndarray]


def read_source_tensors(src: Path) -> dict[str, SourceTensor]:
    """Every tensor of the checkpoint's weight files, memory-mapped, by source name."""
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
    out: dict[str, SourceTensor] = {}
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


def default_dtype(tensors) -> str:
    """The source's dtype (by element count); float32 sources become float16."""
    count: dict[str, int] = {}
    for t in tensors:
        count[t.dtype] = count.get(t.dtype, 0) + int(np.prod(t.shape, dtype=np.int64))
    if not count:
        return "float16"
    return _DEFAULT_DTYPE.get(max(count, key=count.get), "float16")


def _read_index(src: Path, index_name: str) -> tuple[list[Path], dict[str, str]]:
    """The shard files an index names, and its tensor -> shard claims (plus ``__index__``)."""
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


def _safetensors_tensors(path: Path) -> dict[str, SourceTensor]:
    header = read_header(path)  # checks the header and that every tensor lies inside the file
    arrays = read_tensors(path)  # memory maps: nothing is read until a tensor is loaded
    out = {}
    for name, info in header.items():
        out[name] = SourceTensor(name, path, tuple(info["shape"]), info["dtype"],
                                 _numpy_loader(arrays[name], info["dtype"]))
    return out


def _numpy_loader(arr: np.ndarray, st_dtype: str) -> Callable[[], np.ndarray]:
    # F16/F32 go through untouched (a memory map); BF16 bits are widened to float32.
    if st_dtype in ("BF16", "F64"):
        return lambda: to_float32(arr, st_dtype)
    return lambda: arr


def _torch_tensors(path: Path) -> dict[str, SourceTensor]:
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
        st = _TORCH_DTYPES.get(str(t.dtype), str(t.dtype).replace("torch.", ""))
        out[name] = SourceTensor(name, path, tuple(t.shape), st, _torch_loader(t))
    return out


def _torch_loader(t) -> Callable[[], np.ndarray]:
    def load():
        import torch

        x = t.detach()
        if x.dtype in (torch.bfloat16, torch.float64):
            x = x.float()
        return x.numpy()
    return load


# ----------------------------------------------------------------------------- JSON files
def read_image_processor(path: Path) -> dict | None:
    """A directory's image-processor settings: ``preprocessor_config.json``, else the
    ``image_processor`` of ``processor_config.json`` (transformers 5), else None."""
    found = processor_source(path)
    return read_json_object(found, "re-download it") if isinstance(found, Path) else found


def processor_source(path: Path) -> "Path | dict | None":
    """The ``preprocessor_config.json`` file, else processor_config.json's ``image_processor``
    (what a converter writes as ``preprocessor_config.json``), else None."""
    path = Path(path)
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        return pre
    proc = path / "processor_config.json"
    if proc.is_file():
        inner = read_json_object(proc, "re-download it").get("image_processor")
        if isinstance(inner, dict):
            return inner
    return None


def _first_sentence(e: BaseException, limit: int = 120) -> str:
    line = first_line(e, limit)
    return re.split(r"(?<=[a-z)])\. ", line, maxsplit=1)[0].rstrip(".")
