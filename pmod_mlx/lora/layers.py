"""Which modules of a model LoRA adapts or trains in full, and the merge back to plain linears."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from pmod.errors import PmodError
from pmod.lora_data import MODEL_TARGETS, TARGETS, LoraSettings


def _get(module, path: str):
    for part in path.split("."):
        module = module[part] if isinstance(module, dict) else getattr(module, part)
    return module


def _set(module, path: str, value) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, leaf, value)


#: Base layers LoRA adapts: a quantized one (a quantized checkpoint: QLoRA) stays frozen as
#: it is, and mlx-lm's LoRALinear reads its input size from the packed weight.
_LINEARS = (nn.Linear, nn.QuantizedLinear)


def apply_lora(model, settings: LoraSettings) -> list[int]:
    """Freeze ``model`` and add LoRA layers (and trainable routers / projector) in place;
    returns the adapted layer indices. ``mx.random`` draws the ``A`` matrices: seed it first."""
    from mlx_lm.tuner.lora import LoRALinear

    model.freeze()
    layers = model.language_model.layers
    idx = settings.layer_indices(len(layers))
    for i in idx:
        layer = layers[i]
        for t in settings.target_modules:
            if t in MODEL_TARGETS:
                continue
            path = TARGETS[t]
            base = _get(layer, path)
            if not isinstance(base, _LINEARS):
                raise PmodError(f"layer {i} {path} is a {type(base).__name__}, not a linear layer")
            _set(layer, path, LoRALinear.from_base(base, r=settings.rank, dropout=settings.dropout,
                                                   scale=settings.scale))
        if settings.train_routers and "router" in layer:
            layer.router.unfreeze()
    for t in settings.target_modules:
        if t in MODEL_TARGETS:
            parent, _, leaf = MODEL_TARGETS[t].rpartition(".")
            base = _get(model, parent)[leaf] if leaf in _get(model, parent) else None
            if not isinstance(base, _LINEARS):
                raise PmodError(f"--target-modules {t}: the model has no separate {t} (tied embeddings?)")
            _set(model, MODEL_TARGETS[t], LoRALinear.from_base(base, r=settings.rank, dropout=settings.dropout,
                                                               scale=settings.scale))
    if settings.train_projector:
        if "projector" not in model:
            raise PmodError("--train-projector: the model has no multimodal projector")
        if any(isinstance(m, nn.QuantizedLinear) for m in model.projector.children().values()):
            raise PmodError("--train-projector: the projector is quantized, so it cannot be trained in full; "
                            "train it on a float checkpoint (or leave it frozen)")
        model.projector.unfreeze()
    return idx


def adapter_weights(model) -> dict[str, mx.array]:
    """The trainable tensors, by their checkpoint names (``...q_proj.lora_a``, ``...router.weight``)."""
    return dict(tree_flatten(model.trainable_parameters()))


def fuse_model(model) -> None:
    """Replace every LoRA layer by its merged ``nn.Linear`` (mlx-lm's ``LoRALinear.fuse``)."""
    from mlx_lm.tuner.lora import LoRALinear

    for layer in model.language_model.layers:
        for path in TARGETS.values():
            m = _get(layer, path)
            if isinstance(m, LoRALinear):
                _set(layer, path, m.fuse())
    for path in MODEL_TARGETS.values():
        parent, _, leaf = path.rpartition(".")
        if leaf in _get(model, parent) and isinstance(_get(model, path), LoRALinear):
            _set(model, path, _get(model, path).fuse())
