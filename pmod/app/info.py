"""``pmod info``: a checkpoint's config, quantization and per-layer schedule, and the runtimes available."""

from __future__ import annotations

import platform
import sys

import numpy as np

from pmod.format import read_config
from pmod.quantization import describe
from pmod.schedule import capacities, layer_ratios

SCHEDULE_COUNTS = (576, 2880)  # LLaVA-1.5 and LLaVA-NeXT vision-token budgets


def print_info(model, system: bool = False, file=None) -> None:
    file = file or sys.stdout
    if model is None and not system:
        from pmod.errors import PmodError

        raise PmodError("give a model directory (pmod info DIR) or --system")
    if model is not None:
        _print_model(model, file)
    if system:
        _print_system(file)


def _print_model(model, file) -> None:
    c = read_config(model)
    print(f"model: {model}", file=file)
    print(f"decoder: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate "
          f"{c.intermediate_size}, heads {c.num_attention_heads} (kv {c.num_key_value_heads}), "
          f"head_dim {c.head_dim}, vocab {c.vocab_size}, context {c.max_position_embeddings}", file=file)
    if c.mm_projector_type:
        print(f"multimodal: projector {c.mm_projector_type} ({c.mm_hidden_size} -> {c.hidden_size}), "
              f"merge {c.mm_patch_merge_type}, aspect {c.image_aspect_ratio}", file=file)
    for line in describe(c):
        print(line, file=file)
    if not c.is_mod:
        print("p-MoD: none (dense model)", file=file)
        return
    kind, scale, bias = c.weight_norm
    print(f"p-MoD: {c.mod_target_layers}, router factor {c.mod_router_factor}, weight "
          f"{scale}*{kind}(s)+{bias}, routed tokens {c.mod_target_token_type}, decay span "
          f"{c.mod_decay_span or c.num_hidden_layers - 1}", file=file)
    ratios = layer_ratios(c)
    caps = {n: capacities(c, n) for n in SCHEDULE_COUNTS}
    head = f"{'layer':>5}  {'type':<5}  {'ratio':>7}" + "".join(f"  {f'k@{n}':>7}" for n in SCHEDULE_COUNTS)
    print(head, file=file)
    for i, r in enumerate(ratios):
        row = f"{i:>5}  {'dense' if r is None else 'MoD':<5}  {'-' if r is None else f'{r:.4f}':>7}"
        row += "".join(f"  {caps[n][i]:>7}" for n in SCHEDULE_COUNTS)
        print(row, file=file)
    for n in SCHEDULE_COUNTS:
        kept = sum(caps[n])
        print(f"vision tokens kept over all layers at n={n}: {kept}/{n * len(ratios)} "
              f"({100 * kept / (n * len(ratios)):.1f}%)", file=file)


def _runtime(name: str) -> dict | None:
    """A runtime package's ``runtime_info()`` (``pmod.app.registry.RUNTIMES``); None where it does not load."""
    from pmod.app.registry import RUNTIMES, load

    target, extra = RUNTIMES[name]
    try:
        return load(target, extra, f"the {name} runtime is not installed")()
    except Exception:  # noqa: BLE001 - absent or broken: reported as not installed
        return None


def _print_system(file) -> None:
    from pmod import __version__

    print(f"pmod {__version__}, python {platform.python_version()}, {platform.system()} {platform.machine()}",
          file=file)
    print(f"numpy {np.__version__}", file=file)
    mlx = _runtime("mlx")  # first: pmod_mlx loads its BLAS before mlx.core, and before torch
    if mlx is not None:
        info = mlx["blas"]
        blas = info.get("name", "?") + (f" ({info['reason']})" if info.get("reason") else "")
        print(f"mlx {mlx['version']} on {mlx['device']}; BLAS: {blas}", file=file)
    else:
        print("mlx: not installed (pip install 'pmod[mlx]')", file=file)
    export, trt = _runtime("export") or {}, _runtime("trt") or {}
    for name, extra, v in (("torch", "export", export.get("torch")), ("onnxruntime", "export", export.get("onnxruntime")),
                           ("tensorrt", "trt", trt.get("tensorrt"))):
        print(f"{name} {v}" if v else f"{name}: not installed (pip install 'pmod[{extra}]')", file=file)
