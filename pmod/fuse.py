"""LoRA adapters on disk, and merging them into a checkpoint's weights (numpy only).

An adapter directory holds ``adapter_config.json`` and ``adapters.safetensors`` (written
by ``pmod lora``). Its tensors use the checkpoint's names:

- ``<linear>.lora_a`` ``[in, r]`` and ``<linear>.lora_b`` ``[r, out]`` (the layout of
  ``mlx_lm.tuner.lora.LoRALinear``): the linear's weight becomes
  ``W + scale * (lora_a @ lora_b).T`` with ``scale = alpha / rank``;
- any other name (router weights and biases, the projector when it was trained) is a
  full tensor that replaces the checkpoint's.

``merge_adapter`` does the arithmetic for every runtime (the MLX loader applies an
adapter with it); ``fuse`` writes a merged pmod checkpoint that every backend loads. On a
quantized checkpoint (QLoRA) an adapted linear is dequantized, merged in float32 and
quantized again with the checkpoint's settings (MLX does the quantization arithmetic).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from pmod.errors import PmodError

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
ADAPTER_FORMAT = "pmod-lora"
ADAPTER_VERSION = 1


def read_adapter_config(adapter_path) -> dict:
    path = Path(adapter_path)
    if not path.is_dir():
        raise PmodError(f"adapter directory {path} not found")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise PmodError(f"{path} has no {CONFIG_FILE}: pass a directory written by 'pmod lora'")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PmodError(f"{cfg_file} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != ADAPTER_FORMAT:
        raise PmodError(f"{cfg_file} is not a pmod LoRA adapter config (format {ADAPTER_FORMAT!r})")
    if cfg.get("version") != ADAPTER_VERSION:
        raise PmodError(f"{cfg_file}: adapter version {cfg.get('version')} is not supported "
                        f"(expects {ADAPTER_VERSION})")
    if not isinstance(cfg.get("scale"), (int, float)):
        raise PmodError(f"{cfg_file} has no numeric 'scale'")
    return cfg


def read_adapter(adapter_path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config, {name: float32 array})``."""
    from pmod.safetensors_io import read_header, read_tensors, to_float32

    cfg = read_adapter_config(adapter_path)
    f = Path(adapter_path) / ADAPTER_FILE
    if not f.is_file():
        raise PmodError(f"{adapter_path} has no {ADAPTER_FILE} (was the first save reached?)")
    header = read_header(f)
    arrays = read_tensors(f)
    return cfg, {n: to_float32(a, header[n]["dtype"]) for n, a in arrays.items()}


def lora_pairs(tensors: dict) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """``({linear: (lora_a, lora_b)}, {name: full tensor})``; a lone half of a pair is an error."""
    pairs, full = {}, {}
    for name, arr in tensors.items():
        if name.endswith((".lora_a", ".lora_b")):
            base = name.rsplit(".", 1)[0]
            other = base + (".lora_b" if name.endswith(".lora_a") else ".lora_a")
            if other not in tensors:
                raise PmodError(f"adapter tensor '{name}' has no '{other}'")
            pairs[base] = (tensors[base + ".lora_a"], tensors[base + ".lora_b"])
        else:
            full[name] = arr
    return pairs, full


def merged_tensors(cfg: dict, tensors: dict, base: Callable[[str], np.ndarray],
                   shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The checkpoint tensors the adapter changes, merged, as float32.

    ``base(name)`` returns a checkpoint tensor; ``shapes`` maps every checkpoint name to its shape.
    """
    scale = float(cfg["scale"])
    pairs, full = lora_pairs(tensors)
    out = {}
    for linear, (a, b) in sorted(pairs.items()):
        name = linear + ".weight"
        if name not in shapes:
            raise PmodError(f"adapter tensor '{linear}.lora_a' targets '{name}', which the model does not have "
                            "(an adapter trained on another model?)")
        out_dim, in_dim = shapes[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != in_dim or b.shape[1] != out_dim or a.shape[1] != b.shape[0]:
            raise PmodError(f"adapter tensors '{linear}.lora_a' {tuple(a.shape)} / '.lora_b' {tuple(b.shape)} do not "
                            f"fit '{name}' {tuple(shapes[name])} (an adapter trained on another model?)")
        w = np.asarray(base(name), dtype=np.float32)
        out[name] = w + (scale * (a.astype(np.float32) @ b.astype(np.float32))).T
    for name, arr in sorted(full.items()):
        if name not in shapes:
            raise PmodError(f"adapter tensor '{name}' is not a tensor of the model (an adapter trained on "
                            "another model?)")
        if tuple(arr.shape) != tuple(shapes[name]):
            raise PmodError(f"adapter tensor '{name}' has shape {tuple(arr.shape)}, the model's {tuple(shapes[name])}")
        out[name] = np.asarray(arr, dtype=np.float32)
    return out


def merge_adapter(config, cfg: dict, tensors: dict, read: Callable[[str], np.ndarray],
                  dtype: str, ops=None) -> dict[str, np.ndarray]:
    """The checkpoint tensors the adapter changes, merged; ``read(name)`` returns a stored tensor.

    In a quantized checkpoint an adapted (or replaced) quantized linear is dequantized,
    merged, and quantized again into its weight, scales and biases (scales in ``dtype``), with
    ``ops`` (``pmod.quantization.need_ops``).
    """
    from pmod.format import expected_tensors
    from pmod.quantization import PARTS, float_config, need_ops

    q = config.quant
    if q is None:
        return merged_tensors(cfg, tensors, read, expected_tensors(config))
    ops = need_ops(ops, "a LoRA adapter on a quantized checkpoint")
    quantized = {m + ".weight": m for m in q.modules}

    def base(name: str) -> np.ndarray:
        if name in quantized:
            return ops.dequantize_weight(*(read(f"{quantized[name]}.{p}") for p in PARTS), q.bits, q.group_size)
        return read(name)

    merged = merged_tensors(cfg, tensors, base, expected_tensors(float_config(config)))
    for name in [n for n in merged if n in quantized]:
        parts = ops.quantize_weight(merged.pop(name), q.bits, q.group_size, dtype)
        merged.update({f"{quantized[name]}.{p}": a for p, a in zip(PARTS, parts)})
    return merged


def fuse(model_dir, adapter_path, out, dtype: str | None = None, ops=None) -> Path:
    """Write ``out``: the checkpoint ``model_dir`` with the adapter merged into its weights,
    in the base's dtype unless ``dtype`` is given, its tokenizer copied. A quantized base
    gives a quantized result (the adapted linears re-quantized, see :func:`merge_adapter`)."""
    from pmod.format import load_numpy, save_checkpoint, stored_dtype, validate

    config, found = validate(model_dir)
    cfg, tensors = read_adapter(adapter_path)
    dtype = dtype or stored_dtype(found)
    _, weights = load_numpy(model_dir, quantized=True)
    weights.update(merge_adapter(config, cfg, tensors, weights.__getitem__, dtype, ops))
    return save_checkpoint(out, config, weights, dtype=dtype, tokenizer_dir=model_dir)
