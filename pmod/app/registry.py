"""The registry: the one place the applications reach a runtime.

``BACKENDS`` names the engine class (:class:`pmod.engine.Engine`) of each backend,
``TOOLS`` the runtime functions a command calls besides an engine (LoRA training, MLX
quantization, ONNX export, TensorRT build), ``RUNTIMES`` each runtime package's
``runtime_info``. Each is imported by name only when asked for, so no application module
(and nothing in the core) imports a runtime at import time; a missing install is a
one-line error naming the pip extra.
"""

from __future__ import annotations

import importlib

from pmod.engine import Engine
from pmod.errors import PmodError

# backend name -> ("module:factory", pip extra that provides it)
BACKENDS: dict[str, tuple[str, str]] = {
    "mlx": ("pmod_mlx.engine:MLXEngine", "mlx"),
    "torch": ("pmod_export.torch_engine:TorchEngine", "export"),
    "onnx": ("pmod_export.ort_engine:OrtEngine", "export"),
    "trt": ("pmod_trt.engine:TrtEngine", "trt"),
}

# What the applications call in a runtime besides its engine: name -> ("module:function", pip extra).
TOOLS: dict[str, tuple[str, str]] = {
    "lora": ("pmod_mlx.lora.command:run_lora", "mlx"),
    "quantization": ("pmod_mlx.quantize", "mlx"),  # the ops of pmod.quantization.need_ops
    "export_onnx": ("pmod_export.onnx_export:export_onnx", "export"),
    "build_trt": ("pmod_trt.build:build_engines", "trt"),
    "transformers_peer": ("pmod_export.peer:TransformersPeer", "export"),  # scripts/torch_vs_transformers.py
    "torch_op_profile": ("pmod_export.torch_engine:OpProfile", "export"),  # its --profile
}

# Each runtime package's facts for 'pmod info --system': its name -> ("module:runtime_info", pip extra).
RUNTIMES: dict[str, tuple[str, str]] = {
    "mlx": ("pmod_mlx:runtime_info", "mlx"),
    "export": ("pmod_export:runtime_info", "export"),
    "trt": ("pmod_trt:runtime_info", "trt"),
}


def open_engine(path, backend: str = "mlx", dtype: str | None = None, **kwargs) -> Engine:
    """Open a pmod checkpoint directory with the chosen runtime.

    ``dense=True`` gives the plain-LLaVA twin on the same weights: every layer runs over
    every token, routers unused (for p-MoD vs dense comparisons). ``adapter_path=DIR`` (mlx)
    applies a LoRA adapter written by ``pmod lora``; other backends load ``pmod fuse``'s output.
    ``retention=S`` scales every MoD layer's ratio (``pmod.schedule.layer_ratios``): mlx and
    torch take any S > 0; an ONNX/TensorRT export runs at the S it was exported with.
    ``device="cuda"`` (torch): weights and KV caches on that GPU; default the CPU.
    ``seeded_weights=SEED`` (torch): seeded random weights drawn on the device instead of the
    checkpoint's (a directory with only its config.json will do; the GPU check's 7B model).
    """
    if backend not in BACKENDS:
        raise PmodError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if kwargs.get("retention") is None:
        kwargs.pop("retention", None)
    else:
        from pmod.schedule import check_retention

        kwargs["retention"] = check_retention(kwargs["retention"])
    if kwargs.get("device") is None:
        kwargs.pop("device", None)
    elif backend != "torch":
        raise PmodError(f"the {backend} backend takes no device (--device is the torch backend's: mlx picks Metal "
                        "or the CPU itself, an ONNX or TensorRT export says where it runs); drop it")
    if kwargs.get("seeded_weights") is None:
        kwargs.pop("seeded_weights", None)
    elif backend != "torch":
        raise PmodError(f"the {backend} backend takes no seeded_weights (only torch draws weights on its device): "
                        "build the checkpoint (pmod.app.bench.presets.preset_checkpoint) and open that")
    if kwargs.get("adapter_path") is None:
        kwargs.pop("adapter_path", None)
    elif backend != "mlx":
        raise PmodError(f"the {backend} backend takes no LoRA adapter: merge it first with 'pmod fuse --model "
                        f"{path} --adapter-path {kwargs['adapter_path']} --out FUSED' and open FUSED")
    target, extra = BACKENDS[backend]
    return load(target, extra, f"backend {backend!r} is not installed")(path, dtype=dtype, **kwargs)


def tool(name: str, what: str):
    """A runtime's tool (``TOOLS``) for the application step ``what`` (e.g. 'pmod lora')."""
    target, extra = TOOLS[name]
    return load(target, extra, f"{what} needs the {extra} extra")


def load(target: str, extra: str, problem: str):
    """``module:name`` (or a whole ``module``) of a runtime, imported now; a missing install is a one-line error,
    ``problem`` then what is missing and the pip command (a broken import inside the runtime
    stays a bug, not a hint)."""
    module_name, _, name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        top = module_name.split(".")[0]
        if e.name and e.name != top and e.name.startswith(top + "."):
            raise  # a bug inside the runtime, not a missing install
        raise PmodError(f"{problem} ({e.name or e} is missing): pip install 'pmod[{extra}]'") from None
    return getattr(module, name) if name else module
