"""Quantized checkpoints: which linears are quantized, and the tensors that hold them.

A quantized pmod checkpoint holds MLX's affine quantization (``mx.quantize``) of some
linears: per quantized linear ``<module>.weight`` (uint32, ``32 / bits`` values packed
per word: ``[out, in * bits / 32]``), ``<module>.scales`` and ``<module>.biases``
(``[out, in / group_size]``, in the checkpoint's float dtype), plus ``<module>.bias``
when the linear has one. ``config.json`` lists them in ``quantization: {bits,
group_size, modules}``. ``pmod convert --quantize`` quantizes the decoder's and the
projector's linears and the LM head; routers (one output each, and they decide what is
kept), norms, embeddings and the vision tower stay float, and so does a linear whose
input size the group size does not divide.

This module holds the rules and the shapes (numpy only). The arithmetic is MLX's
(``pmod_mlx.quantize``): the functions that need it take it as ``ops``, an object with
``quantize_weight`` and ``dequantize_weight`` (the CLI passes the MLX runtime's, from
``pmod.app.registry.tool("quantization", ...)``), so the core never imports a runtime.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pmod.errors import BadSetting, PmodError

if TYPE_CHECKING:
    from pmod.config import PmodConfig

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
PACKED = "U32"  # safetensors dtype of a packed weight
PARTS = ("weight", "scales", "biases")
_FIX = "re-convert with 'pmod convert SRC DST --quantize 4|8'"


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int
    modules: tuple[str, ...]

    @classmethod
    def from_entry(cls, entry) -> "Quantization | None":
        """The ``quantization`` value of ``config.json`` (None: a float checkpoint), checked."""
        if entry is None:
            return None
        if not isinstance(entry, dict) or set(entry) != {"bits", "group_size", "modules"}:
            raise PmodError(f"config key 'quantization' must be {{\"bits\", \"group_size\", \"modules\"}}, "
                            f"got {entry!r:.120}; {_FIX}")
        bits, group_size, modules = entry["bits"], entry["group_size"], entry["modules"]
        if not _one_of(bits, BITS):
            raise PmodError(f"config key 'quantization' has bits {bits!r}; expected 4 or 8; {_FIX}")
        if not _one_of(group_size, GROUP_SIZES):
            raise PmodError(f"config key 'quantization' has group_size {group_size!r}; expected 32, 64 or 128; {_FIX}")
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules) \
                or len(set(modules)) != len(modules):
            raise PmodError(f"config key 'quantization' needs 'modules' as a list of distinct module names; {_FIX}")
        return cls(bits, group_size, tuple(modules))

    def to_entry(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "modules": list(self.modules)}

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, int]]:
        """``{part: shape}`` of one quantized linear's weight, scales and biases."""
        groups = in_features // self.group_size
        return {"weight": (out_features, in_features * self.bits // 32),
                "scales": (out_features, groups), "biases": (out_features, groups)}


def check_settings(bits, group_size) -> None:
    """A one-line error for a bit width or group size MLX's affine quantization does not take."""
    if not _one_of(bits, BITS):
        raise BadSetting(f"{{quantize}} must be 4 or 8 (bits per weight), got {bits!r}", "quantize")
    if not _one_of(group_size, GROUP_SIZES):
        raise BadSetting(f"{{group_size}} must be 32, 64 or 128, got {group_size!r}", "group_size")


def _one_of(value, options) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in options


def linear_shapes(config: "PmodConfig") -> dict[str, tuple[int, int]]:
    """The linears pmod may quantize, by module name: ``(out_features, in_features)``."""
    c = config
    H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    out: dict[str, tuple[int, int]] = {}
    for i in range(c.num_hidden_layers):
        p = f"language_model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (q, H)), ("self_attn.k_proj", (kv, H)),
                            ("self_attn.v_proj", (kv, H)), ("self_attn.o_proj", (H, q)),
                            ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)), ("mlp.down_proj", (H, I))):
            out[p + name] = shape
    if c.mm_projector_type is not None and c.mm_hidden_size is not None:
        out["projector.linear_1"] = (H, c.mm_hidden_size)
        if c.mm_projector_type == "mlp2x_gelu":
            out["projector.linear_2"] = (H, H)
    if not c.tie_word_embeddings:
        out["language_model.lm_head"] = (c.vocab_size, H)
    return out


def quantizable_modules(config: "PmodConfig", group_size: int) -> list[str]:
    """The linears ``pmod convert --quantize`` quantizes: those whose input size ``group_size`` divides."""
    return [m for m, (_, n_in) in linear_shapes(config).items() if n_in % group_size == 0]


def with_quantization(config: "PmodConfig", bits: int, group_size: int) -> "PmodConfig":
    """``config`` of the model quantized with these settings."""
    q = Quantization(bits, group_size, tuple(quantizable_modules(config, group_size)))
    return dataclasses.replace(config, quantization=q.to_entry())


def float_config(config: "PmodConfig") -> "PmodConfig":
    """``config`` of the same model in float (no quantization entry)."""
    return dataclasses.replace(config, quantization=None)


def quantize_shapes(config: "PmodConfig", shapes: dict[str, tuple]) -> dict[str, tuple]:
    """The float model's tensor shapes with each quantized linear's weight replaced by its
    weight, scales and biases (in that order); a module the entry may not list is an error."""
    q = config.quant
    if q is None:
        return shapes
    linears = linear_shapes(config)
    for m in q.modules:
        if m not in linears:
            raise PmodError(f"config key 'quantization' lists '{m}', which is not a linear pmod quantizes in this "
                            f"model (decoder, projector, LM head); {_FIX}")
        if linears[m][1] % q.group_size:
            raise PmodError(f"config key 'quantization' lists '{m}', whose input size {linears[m][1]} is not a "
                            f"multiple of the group size {q.group_size}; {_FIX}")
    out: dict[str, tuple] = {}
    quantized = set(q.modules)
    for name, shape in shapes.items():
        module = name[:-len(".weight")]
        if name.endswith(".weight") and module in quantized:
            out.update({f"{module}.{part}": s for part, s in q.shapes(*linears[module]).items()})
        else:
            out[name] = shape
    return out


def packed_weights(config: "PmodConfig") -> set[str]:
    """Names of the uint32 packed weights (empty for a float checkpoint)."""
    q = config.quant
    return set() if q is None else {m + ".weight" for m in q.modules}


def require_float(config: "PmodConfig", path, what: str) -> None:
    """Refuse a quantized checkpoint where only float weights will do (torch, ONNX, numpy)."""
    q = config.quant
    if q is not None:
        raise PmodError(f"{path} is a {q.bits}-bit quantized checkpoint, which only the MLX backend runs; {what} "
                        f"needs float weights: convert the model without --quantize (or write a float copy with "
                        f"'pmod convert {path} DST --dequantize')")


def describe(config: "PmodConfig") -> list[str]:
    """Lines for ``pmod info``: the settings, then which linears are quantized and which stay float."""
    q = config.quant
    if q is None:
        return ["quantization: none (float weights)"]
    linears = linear_shapes(config)
    quantized = set(q.modules)
    ragged = [m for m, (_, n_in) in linears.items() if m not in quantized and n_in % q.group_size]
    unlisted = [m for m, (_, n_in) in linears.items() if m not in quantized and not n_in % q.group_size]
    lines = [f"quantization: {q.bits}-bit affine (MLX), group size {q.group_size}: "
             f"{len(quantized)} of {len(linears)} linears quantized"]
    lines += [f"  quantized: {item}" for item in _grouped(q.modules)]
    lines += [f"  float (input size not a multiple of {q.group_size}): {item}" for item in _grouped(ragged)]
    lines += [f"  float (not listed): {item}" for item in _grouped(unlisted)]
    lines.append("  float always: routers, norms, embeddings, vision tower")
    return lines


def _grouped(modules) -> list[str]:
    """Module names with the layer index folded: ``language_model.layers.N.mlp.down_proj (N = 0..5)``."""
    layers: dict[str, list[int]] = {}
    for m in modules:
        match = re.match(r"^(language_model\.layers\.)(\d+)(\..+)$", m)
        key = f"{match.group(1)}N{match.group(3)}" if match else m
        layers.setdefault(key, []).append(int(match.group(2)) if match else -1)
    out = []
    for key, idx in layers.items():
        if idx == [-1]:
            out.append(key)
        else:
            span = f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ", ".join(map(str, idx))
            out.append(f"{key} (N = {span})")
    return out


def need_ops(ops, what: str):
    """``ops`` (the quantization arithmetic), or a one-line error for a caller that gave none."""
    if ops is None:
        raise PmodError(f"{what} needs MLX's quantization arithmetic: pass ops=pmod_mlx.quantize "
                        "(the pmod CLI does this when the mlx extra is installed)")
    return ops


def quantized_loaders(config: "PmodConfig", loaders: dict[str, Callable], bits: int, group_size: int,
                      dtype: str, ops) -> tuple["PmodConfig", dict[str, Callable]]:
    """The quantized model's config and tensor loaders, from the float model's.

    A quantized linear's three tensors come from one ``mx.quantize`` of its weight as
    stored in ``dtype``, run when the first of them is read (the writer reads them in a
    row), so a large model converts one linear at a time.
    """
    check_settings(bits, group_size)
    ops = need_ops(ops, "pmod convert --quantize")
    qconfig = with_quantization(config, bits, group_size)
    out = dict(loaders)
    for m in qconfig.quant.modules:
        weight, done = out.pop(m + ".weight"), {}

        def part(key, weight=weight, done=done):
            def load():
                if not done:
                    done.update(zip(PARTS, ops.quantize_weight(weight(), bits, group_size, dtype)))
                return done.pop(key)
            return load

        out.update({f"{m}.{key}": part(key) for key in PARTS})
    return qconfig, out


def dequantized_loaders(config: "PmodConfig", loaders: dict[str, Callable], ops) -> tuple["PmodConfig", dict[str, Callable]]:
    """The float model's config and tensor loaders, from a quantized checkpoint's (``--dequantize``)."""
    q = config.quant
    ops = need_ops(ops, "pmod convert --dequantize")
    out = dict(loaders)
    for m in q.modules:
        w, s, b = (out.pop(f"{m}.{key}") for key in PARTS)
        out[m + ".weight"] = lambda w=w, s=s, b=b: ops.dequantize_weight(w(), s(), b(), q.bits, q.group_size)
    return float_config(config), out
