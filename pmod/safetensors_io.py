"""Minimal safetensors reading and writing in numpy, bfloat16 included.

The ``safetensors`` numpy binding has no bfloat16 (numpy lacks the dtype) and real
p-MoD checkpoints are bfloat16, so the numpy-only core reads and writes the (simple,
published) file layout itself: an 8-byte little-endian header length, a JSON header
of ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data.

bfloat16 tensors come back as ``uint16`` bit patterns (``BF16`` in the header); use
:func:`to_float32` to widen them. Every problem raises a one-line ``PmodError`` that
names the file (and tensor).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from pmod.errors import PmodError

_NP = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U32": np.uint32, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | Path) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "data_offsets"}}`` of a file, checked against its size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PmodError(f"{path}: truncated safetensors file (no header); re-copy or re-convert it")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise PmodError(f"{path}: truncated or corrupt safetensors header; re-copy or re-convert it")
            raw = f.read(n)
    except OSError as e:
        raise PmodError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PmodError(f"{path}: corrupt safetensors header (not JSON); re-copy or re-convert it") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            itemsize = np.dtype(_NP[dtype]).itemsize
        except (KeyError, TypeError, ValueError):
            raise PmodError(f"{path}: tensor '{name}' has an unreadable header entry") from None
        if end - start != itemsize * int(np.prod(shape, dtype=np.int64)):
            raise PmodError(f"{path}: tensor '{name}' size does not match its shape {shape}")
        if end > data_size:
            raise PmodError(
                f"{path}: truncated file: tensor '{name}' ends past the end of the data; re-copy or re-convert it")
    return header


def read_tensors(path: str | Path, names=None) -> dict[str, np.ndarray]:
    """Memory-map the tensors of one file (all, or ``names``) as numpy arrays."""
    path = Path(path)
    header = read_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    out = {}
    for name in header if names is None else names:
        info = header[name]
        start, end = info["data_offsets"]
        dt = np.dtype(_NP[info["dtype"]]).newbyteorder("<")
        count = (end - start) // dt.itemsize
        arr = np.memmap(path, dtype=dt, mode="r", offset=8 + n + start, shape=(count,)) if count else \
            np.zeros(0, dtype=dt)
        out[name] = arr.reshape(info["shape"])
    return out


def to_float32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    """Widen a tensor read from a file (``BF16`` bit patterns included) to float32."""
    if st_dtype == "BF16":
        return (np.asarray(arr, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(arr, dtype=np.float32)


def float32_to_bf16_bits(arr: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even); returns uint16 bit patterns."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(arr)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def write_file(path: str | Path, tensors: dict[str, tuple[str, np.ndarray]],
               metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: (st_dtype, array)}``; BF16 arrays are uint16 bit patterns."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, (st_dtype, arr) in tensors.items():
        arr = np.ascontiguousarray(arr, dtype=np.dtype(_NP[st_dtype]).newbyteorder("<"))
        header[name] = {"dtype": st_dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(memoryview(arr).cast("B"))
        f.flush()
        os.fsync(f.fileno())
