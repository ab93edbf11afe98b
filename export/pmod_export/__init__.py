"""pmod_export: the p-MoD model in torch with static per-layer capacities, its ONNX export,
a TensorRT-compatibility lint, and an ONNX Runtime engine. See docs/EXPORT.md.

Backends: ``pmod.open_engine(dir, backend="torch")`` (a pmod checkpoint directory) and
``backend="onnx"`` (a directory written by ``pmod export onnx``). Imports nothing from
``pmod_mlx``; heavy modules (torch, onnx, onnxruntime) load only when used.
"""


def runtime_info() -> dict:
    """This runtime's libraries (``pmod info --system``): ``torch`` and ``onnxruntime`` versions
    (None: not installed, or not loading) and ``providers`` (ONNX Runtime's execution providers)."""
    out = dict(torch=None, onnxruntime=None, providers=[])
    try:
        from .torch_loader import torch  # torch with its own BLAS (see there)

        out["torch"] = torch.__version__
    except Exception:  # noqa: BLE001 - absent or broken: reported as not installed
        pass
    try:
        import onnxruntime as ort

        out["onnxruntime"], out["providers"] = ort.__version__, list(ort.get_available_providers())
    except Exception:  # noqa: BLE001 - absent or broken: reported as not installed
        pass
    return out
