"""pmod_trt: TensorRT engines built from ``pmod export onnx`` graphs, and a TensorRT backend.

* ``pmod trt build --onnx DIR --out DIR`` (:func:`pmod_trt.build.build_engines`): one engine
  per exported graph, with optimisation profiles computed from the export manifest
  (:mod:`pmod_trt.profiles`), a shared timing cache, and a ``manifest.json`` that records the
  TensorRT version and the GPU the engines are for (:mod:`pmod_trt.manifest`).
* ``pmod.open_engine(dir, backend="trt")`` (:class:`pmod_trt.engine.TrtEngine`): the
  engines behind the shared ``pmod.engine.Engine`` interface, per-layer KV buffers kept on
  the GPU between steps; CUDA memory and streams through cuda-python (:mod:`pmod_trt.cuda`).

Importing ``pmod_trt`` (or any of its modules) needs neither TensorRT nor a GPU: both are
loaded only when an engine is built or opened (:mod:`pmod_trt.deps`), and their absence is
a one-line ``PmodError``. Depends on ``pmod`` only, never on ``pmod_export`` or ``pmod_mlx``.
See docs/TENSORRT.md.
"""


def runtime_info() -> dict:
    """This runtime's library (``pmod info --system``): the ``tensorrt`` version (None: not
    installed, or not loading). Any version is reported; opening an engine checks it."""
    import importlib

    try:
        return dict(tensorrt=importlib.import_module("tensorrt").__version__)
    except Exception:  # noqa: BLE001 - absent or broken (e.g. no CUDA libraries): reported as not installed
        return dict(tensorrt=None)
