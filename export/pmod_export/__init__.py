"""pmod_export: the p-MoD model in torch with static per-layer capacities, its ONNX export,
a TensorRT-compatibility lint, and an ONNX Runtime engine. See docs/EXPORT.md.

Backends: ``pmod.open_engine(dir, backend="torch")`` (a pmod checkpoint directory) and
``backend="onnx"`` (a directory written by ``pmod export onnx``). Imports nothing from
``pmod_mlx``; heavy modules (torch, onnx, onnxruntime) load only when used.
"""
