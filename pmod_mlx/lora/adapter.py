"""The adapter directory a LoRA run writes (the format is ``pmod.fuse``'s, which reads it)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

from pmod.fuse import ADAPTER_FILE, ADAPTER_FORMAT, ADAPTER_VERSION, CONFIG_FILE
from pmod.lora_data import LoraSettings

from .layers import adapter_weights

#: The trainable weights and the optimizer state at the last save: what ``--resume`` reads.
STATE_FILE = "training_state.safetensors"


def adapter_config(model, settings: LoraSettings, base_model="", step: int = 0, extra: dict | None = None) -> dict:
    s = asdict(settings)
    s["target_modules"] = list(s["target_modules"])
    config = model.config
    return {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, **s, "scale": settings.scale,
            "layers": settings.layer_indices(config.num_hidden_layers), "base_model": str(base_model),
            "base": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
            "step": step, **(extra or {})}


def save_adapter(model, settings: LoraSettings, out, base_model="", step: int = 0, extra: dict | None = None,
                 state: dict | None = None) -> Path:
    """Write ``adapters.safetensors`` + ``adapter_config.json`` into ``out``, each replaced
    atomically; with ``state`` (optimizer tensors) also ``training_state.safetensors``, written
    first: it alone is what ``--resume`` reads, so a crash between the files is harmless."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    meta = {"step": str(step), "format": ADAPTER_FORMAT}
    if state is not None:
        full = {**{f"param.{k}": v for k, v in weights.items()}, **state}
        mx.eval(full)
        _atomic_write(out / STATE_FILE, lambda p: mx.save_safetensors(str(p), full, metadata=meta))
    mx.eval(weights)
    _atomic_write(out / ADAPTER_FILE, lambda p: mx.save_safetensors(str(p), weights, metadata=meta))
    text = json.dumps(adapter_config(model, settings, base_model, step, extra), indent=2)
    _atomic_write(out / CONFIG_FILE, lambda p: p.write_text(text))
    return out


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path`` (same directory: an atomic replace)."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
