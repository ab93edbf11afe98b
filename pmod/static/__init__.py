"""The static-graph contract shared by every fixed-graph runtime (ONNX Runtime, TensorRT).

numpy only; ``onnx`` is imported lazily by the functions that read graphs (the lint).

* :mod:`~pmod.static.contract`: tensor names, export dtypes and targets, TensorRT's TopK
  limit and how a selection is split under it, the largest single image's token count.
* :mod:`~pmod.static.manifest`: ``manifest.json`` of an export or engine directory (one
  schema, one reader and writer).
* :mod:`~pmod.static.chunk`: how the host turns a prefill chunk into a graph's inputs
  (text and vision streams, the per-layer kept-count carriers, buckets).
* :mod:`~pmod.static.cache`: per-layer KV buffers (host, and the base of device buffers).
* :mod:`~pmod.static.engine`: the engine base the ONNX Runtime and TensorRT backends share.
* :mod:`~pmod.static.lint`: the TensorRT-compatibility lint.

Graph shapes follow the actual vision count ``n`` (bounded by the exported maximum ``N``):
dense layers run the text plus the ``n`` vision tokens, and MoD layer ``l`` takes its TopK's
K from the shape of a carrier input the host sizes to ``pmod.schedule.kept_count(n, r_l)``,
so the graph never does ratio arithmetic. A target that wants constant K gets one graph per
vision bucket instead. docs/EXPORT.md describes the graphs.
"""
