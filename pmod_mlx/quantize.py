"""MLX affine quantization for pmod checkpoints (``pmod.quantization`` has the rules and shapes).

The pmod core stays free of MLX: ``pmod convert --quantize``, ``--dequantize`` and
``pmod fuse`` on a quantized base get this module as the ``ops`` of
``pmod.quantization.need_ops`` (the CLI through ``pmod.app.registry.tool("quantization")``). Numpy goes in and out; what is stored is exactly what
``mx.quantize`` returns for the weight as held in the checkpoint's dtype.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pmod.errors import PmodError
from pmod.quantization import Quantization

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def quantize_weight(w: np.ndarray, bits: int, group_size: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mx.quantize`` of ``w`` ``[out, in]`` cast to ``dtype`` first (as a float checkpoint
    in ``dtype`` would hold it): packed uint32 weight, then scales and biases as float32
    arrays holding ``dtype`` values (so writing them in ``dtype`` is exact)."""
    a = mx.array(np.asarray(w, dtype=np.float32)).astype(_DTYPES[dtype])
    packed, scales, biases = mx.quantize(a, group_size=group_size, bits=bits)
    return np.array(packed), np.array(scales.astype(mx.float32)), np.array(biases.astype(mx.float32))


def dequantize_weight(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
                      group_size: int) -> np.ndarray:
    """The float32 weight ``[out, in]`` a quantized linear computes with (``mx.dequantize``)."""
    f32 = lambda a: mx.array(np.asarray(a, dtype=np.float32))  # noqa: E731
    w = mx.dequantize(mx.array(np.asarray(packed, dtype=np.uint32)), f32(scales), f32(biases),
                      group_size=group_size, bits=bits)
    return np.array(w)


def quantize_model(model: nn.Module, q: Quantization) -> None:
    """Swap the linears ``q`` lists for ``nn.QuantizedLinear``, ready for the checkpoint's tensors."""
    wanted = set(q.modules)
    found: set[str] = set()

    def predicate(path: str, module: nn.Module) -> bool:
        if path in wanted and isinstance(module, nn.Linear):
            found.add(path)
            return True
        return False

    nn.quantize(model, group_size=q.group_size, bits=q.bits, class_predicate=predicate)
    if found != wanted:  # pmod.format.validate checks the names first: this is a pmod bug
        raise PmodError(f"quantized module '{sorted(wanted - found)[0]}' is not a linear of the MLX model; "
                        "report this as a bug")
