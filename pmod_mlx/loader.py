"""Load a pmod checkpoint directory into the MLX model."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from pmod.errors import PmodError
from pmod.format import stored_dtype, validate

from .model import Model
from .quantize import quantize_model
from .vision import sanitize

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype() -> str:
    """float16 on Metal, float32 on the CPU backend (half precision is no faster there)."""
    return "float16" if mx.metal.is_available() else "float32"


def load(path: str | Path, dtype: str | None = None, adapter_path: str | Path | None = None,
         retention: float = 1.0) -> Model:
    """Validate and load a pmod checkpoint; ``dtype`` casts every float weight (default per device).

    ``adapter_path``: a LoRA adapter directory (``pmod lora``), merged into the weights as
    ``pmod fuse`` would (in float32, before the cast). ``retention`` scales the MoD layers'
    ratios (``pmod.schedule.layer_ratios``). A quantized checkpoint loads its linears as
    ``nn.QuantizedLinear`` (packed weights as stored, scales and biases cast to ``dtype``).
    """
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise PmodError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    config, found = validate(path)
    weights = {}
    for f in sorted({f for f, _ in found.values()}):
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise PmodError(f"{f}: cannot be read by MLX ({e}); re-copy or re-convert the checkpoint") from None
    if adapter_path is not None:
        weights.update(_merged_adapter(adapter_path, config, weights, stored_dtype(found)))
    model = Model(config, retention)
    if config.quant is not None:
        quantize_model(model, config.quant)
    weights = sanitize(weights)
    target = DTYPES[dtype]
    model.load_weights([(k, v if v.dtype == mx.uint32 else v.astype(target)) for k, v in weights.items()],
                       strict=True)
    mx.eval(model.parameters())
    return model


def _merged_adapter(adapter_path, config, weights: dict, dtype: str) -> dict:
    import numpy as np

    from pmod.fuse import merge_adapter, read_adapter
    from pmod_mlx import quantize

    def read(name: str) -> np.ndarray:
        a = weights[name]
        return np.array(a if a.dtype == mx.uint32 else a.astype(mx.float32))

    cfg, tensors = read_adapter(adapter_path)
    return {n: mx.array(v) for n, v in merge_adapter(config, cfg, tensors, read, dtype, quantize).items()}
