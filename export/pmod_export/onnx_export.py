"""``pmod export onnx``: a pmod checkpoint -> ONNX graphs + manifest, checked (and linted for TensorRT).

Graphs (``docs/EXPORT.md`` has their inputs and outputs):

* ``embed``: token ids -> embeddings (the table lives here once).
* ``vision``: pixels + the packing index ``ImageInput.feature_index()`` -> image tokens.
* ``prefill``: the decoder for chunks of up to ``N = --max-vision-tokens`` routed vision
  tokens, its shapes following the chunk's ``n`` (``shape`` form); or, with ``--buckets``,
  one ``prefill_B`` per bucket with ``B`` vision slots and constant capacities.
* ``decode``: the decoder with no vision stream (decode steps, text-only chunks).

``--target ort`` (default) writes attention as ONNX Runtime's fused ``com.microsoft``
``MultiHeadAttention``; ``--target trt`` the plain pattern TensorRT's parser takes and fuses,
and runs the TensorRT-compatibility lint (``pmod.static.lint``). The manifest records the
target, and each runtime refuses the other's graphs in one line.

Export uses torch's TorchScript-based ONNX exporter (``dynamo=False``): it ships with
every torch pmod supports (>= 2.2) and needs no onnxscript; torch 2.9+ marks it
deprecated, so its warning is silenced here. Each graph is then post-processed
(``place_attention_bias``, ``narrow_index_casts``), saved (weights as external data past
``external_data_bytes``), checked with ``onnx.checker.check_model(full_check=True)`` and
shape-inferred (strict); any failure leaves no output directory (``pmod.format.atomic_dir``).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from pmod.errors import PmodError
from pmod.format import TOKENIZER_FILES, atomic_dir, read_config
from pmod.image import PREPROCESSOR_FILE
from pmod.quantization import require_float
from pmod.schedule import capacities, check_retention, kept_count, layer_ratios
from pmod.static.contract import (DEFAULT_TARGET, EXPORT_DTYPES, OPSET, TARGETS, bucket_graph, check_buckets,
                                  geometric_buckets, keep_names, kv_names, one_image_vision_tokens, stage_sizes)
from pmod.static.manifest import EXPORT_FORMAT, GraphSpec, Manifest, TensorSpec

#: Graphs whose weights pass this many bytes keep them in ``<graph>.onnx.data``
#: (protobuf cannot hold more than 2 GiB in one file).
EXTERNAL_DATA_BYTES = 1 << 30
_NP_NAMES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 9: "bool", 11: "float64", 16: "bfloat16"}
_INDEX_INPUTS = {"Gather": 1, "GatherElements": 1, "ScatterElements": 1}
_ANY_TYPE_INPUTS = {"Shape": 0, "Size": 0}  # read only the shape


def export_onnx(model_dir, out_dir, max_vision_tokens: int | None = None, dtype: str = "float32",
                max_context: int | None = None, external_data_bytes: int | None = None,
                retention: float = 1.0, target: str = DEFAULT_TARGET, buckets=None) -> Path:
    """Export a pmod checkpoint to ``out_dir`` (which must not exist); return its path.

    ``max_vision_tokens`` (N) defaults to :func:`pmod.static.contract.one_image_vision_tokens`
    (or the largest bucket). ``retention`` scales every MoD layer's ratio
    (``pmod.schedule.layer_ratios``); the graphs are built for it and the manifest records it.
    ``target``: ``ort`` or ``trt``. ``buckets``: increasing vision-slot counts (the last one
    N), or ``"geometric"`` for a doubling ladder ending at N; None for the shape-following
    prefill graph. ``external_data_bytes``: a graph whose weights exceed it stores them in
    ``<graph>.onnx.data`` (default ``EXTERNAL_DATA_BYTES``).
    """
    config = read_config(model_dir)  # cheap checks before the weights load
    require_float(config, model_dir, "pmod export onnx")
    retention = check_retention(retention)
    if target not in TARGETS:
        raise PmodError(f"--target {target!r} is not supported: choose one of {', '.join(TARGETS)}")
    if dtype not in EXPORT_DTYPES:
        raise PmodError(f"--dtype {dtype!r} is not supported for ONNX export: choose one of {', '.join(EXPORT_DTYPES)}")
    limit = config.max_position_embeddings
    T = limit if max_context is None else max_context
    if not isinstance(T, int) or not 0 < T <= limit:
        raise PmodError(f"--max-context must be in 1..{limit} (max_position_embeddings), got {T!r}")
    N = max_vision_tokens
    if N is not None and (not isinstance(N, int) or isinstance(N, bool) or N < 0):
        raise PmodError(f"--max-vision-tokens must be a non-negative integer, got {N!r}")
    if buckets is not None:
        if buckets == "geometric":
            buckets = geometric_buckets(one_image_vision_tokens(config) if N is None else N)
        buckets = check_buckets(buckets, T)
        if N is not None and buckets[-1] != N:
            raise PmodError(f"--buckets must end at --max-vision-tokens {N} (the largest bucket is N), "
                            f"got {','.join(map(str, buckets))}")
        N = buckets[-1]
    if N is None:
        N = one_image_vision_tokens(config)
    if N > T:
        raise PmodError(f"--max-vision-tokens {N} exceeds the context of {T} tokens; lower it or raise --max-context")
    if N and config.mm_projector_type is None:
        raise PmodError(f"{model_dir} is a text-only model (no mm_projector_type): export it with --max-vision-tokens 0")
    if buckets is not None and not N:
        raise PmodError("--buckets needs a model with vision tokens to route (--max-vision-tokens > 0)")
    if out_dir is not None and Path(out_dir).exists():
        raise PmodError(f"output {out_dir} already exists; remove it or choose another path")

    from . import torch_loader  # before torch, see there
    import torch

    torch_loader.check()

    from .model import load

    if external_data_bytes is None:
        external_data_bytes = EXTERNAL_DATA_BYTES
    model = load(model_dir, dtype)
    H = config.hidden_size
    tdtype = model.dtype
    with atomic_dir(out_dir) as tmp:
        work = tmp / ".work"
        work.mkdir()
        graphs: dict[str, GraphSpec] = {}

        ids = torch.tensor([[1, 2, 3]], dtype=torch.int32)
        where = dict(tmp=tmp, work=work, external_data_bytes=external_data_bytes, target=target)
        graphs["embed"] = _export_graph(
            model.embed(), (ids,), ["input_ids"], ["inputs_embeds"],
            {"input_ids": {1: "tokens"}, "inputs_embeds": {1: "tokens"}}, {"inputs_embeds": [1, "tokens", H]},
            name="embed", **where)

        if model.has_vision:
            tower = model.vision_tower
            pixels = torch.zeros(2, tower.channels, tower.image_size, tower.image_size, dtype=tdtype)
            index = torch.tensor([0, 1, 0], dtype=torch.int32)  # any valid rows
            graphs["vision"] = _export_graph(
                model.vision(), (pixels, index), ["pixel_values", "feature_index"], ["image_features"],
                {"pixel_values": {0: "tiles"}, "feature_index": {0: "image_tokens"},
                 "image_features": {0: "image_tokens"}}, {"image_features": ["image_tokens", H]},
                name="vision", **where)

        decoders = [("decode", model.decoder("text", None, T, retention, target))]
        if N and buckets is None:
            decoders.append(("prefill", model.decoder("shape", N, T, retention, target)))
        for b in buckets or []:
            decoders.append((bucket_graph(b), model.decoder("bucket", b, T, retention, target)))
        for name, decoder in decoders:
            graphs[name] = _export_graph(decoder, *_decoder_example(config, decoder, tdtype, T), name=name, **where)
        shutil.rmtree(work)

        source = Path(model_dir)
        for f in TOKENIZER_FILES + (PREPROCESSOR_FILE,):
            if (source / f).is_file():
                shutil.copy2(source / f, tmp / f)
        manifest = Manifest(
            format=EXPORT_FORMAT, target=target, dtype=dtype, max_vision_tokens=N, max_context=T, opset=OPSET,
            form="shape" if buckets is None else "buckets", buckets=buckets,
            capacities=capacities(config, N, retention), layer_ratios=layer_ratios(config, retention),
            retention=retention,
            kv={"num_layers": config.num_hidden_layers, "num_key_value_heads": config.num_key_value_heads,
                "head_dim": config.head_dim,
                "layout": "[1, entries, num_key_value_heads, head_dim], positions int32 [1, entries]"},
            config=config.to_dict(), graphs=graphs)
        findings = _check_all(tmp, graphs, lint=target == "trt")
        if findings:
            raise PmodError(f"the exported graphs fail the TensorRT-compatibility lint ({len(findings)} "
                            f"finding(s), first: {findings[0]}); report this as a bug")
        if target == "trt":
            manifest.lint = {"rules": "pmod.static.lint", "findings": 0, "graphs": sorted(graphs)}
        manifest.write(tmp)
    return Path(out_dir)


def _decoder_example(config, decoder, dtype, max_context: int):
    """Example inputs, input/output names, dynamic axes and output shapes of a decoder graph.

    The shape form is traced at its largest ``n`` (N), so every carrier has a length to trace.
    """
    import torch

    H, form = config.hidden_size, decoder.form
    at = lambda n: torch.arange(n, dtype=torch.int32)[None] % max_context  # noqa: E731 - any valid positions
    args = [torch.zeros(1, 3, H, dtype=dtype), at(3)]
    inputs = ["text_embeds", "text_positions"]
    axes = {"text_embeds": {1: "text_len"}, "text_positions": {1: "text_len"}}
    extra = [[] for _ in decoder.lm.layers]  # per layer: the dimensions its new slots add to text_len
    if form == "shape":
        n = decoder.size
        args += [torch.zeros(1, n, H, dtype=dtype), at(n)]
        inputs += ["vision_embeds", "vision_positions"]
        axes.update(vision_embeds={1: "vision_len"}, vision_positions={1: "vision_len"})
        for l, (r, stages) in enumerate(zip(decoder.ratios, decoder.stages)):
            if r is None:
                extra[l] = ["vision_len"]
                continue
            for name, size in zip(keep_names(l, stages), stage_sizes(kept_count(n, r), stages)):
                args.append(torch.zeros(size, dtype=torch.bool))
                inputs.append(name)
                axes[name] = {0: name}
                extra[l].append(name)
    elif form == "bucket":
        B = decoder.size
        args += [torch.zeros(1, B, H, dtype=dtype), at(B), torch.tensor([B], dtype=torch.int32)]
        inputs += ["vision_embeds", "vision_positions", "n_vision"]
        extra = [[str(c)] if c else [] for c in decoder.capacities]
    outputs, shapes = ["logits"], {"logits": [1, config.vocab_size]}
    kv_dims = [config.num_key_value_heads, config.head_dim]
    for l in range(len(decoder.lm.layers)):
        args += [torch.zeros([1, 2] + kv_dims, dtype=dtype), torch.zeros([1, 2] + kv_dims, dtype=dtype), at(2)]
        inputs += kv_names(l, "past")
        outputs += kv_names(l, "new")
        slots = "+".join(["text_len"] + extra[l])
        axes.update({n: {1: f"past_len_{l}"} for n in kv_names(l, "past")})
        axes.update({n: {1: slots} for n in kv_names(l, "new")})
        k, v, p = kv_names(l, "new")
        shapes.update({k: [1, slots] + kv_dims, v: [1, slots] + kv_dims, p: [1, slots]})
    return tuple(args), inputs, outputs, axes, shapes


def _export_graph(module, args, inputs, outputs, axes, output_shapes=None, *, name, tmp: Path, work: Path,
                  external_data_bytes: int, target: str):
    import onnx
    import torch

    raw = work / f"{name}.onnx"
    from .decoder import StaticDecoder

    contrib = {"custom_opsets": {"com.microsoft": 1}} if target == "ort" and isinstance(module, StaticDecoder) else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation, tracer notes
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(module, args, str(raw), opset_version=OPSET, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=True,
                              **contrib, **_torchscript_exporter())
    # Past 2 GiB torch writes the weights as files next to ``raw``: edit the graph without
    # them (shape inference cannot take a >2 GiB message), then attach them to save.
    model = onnx.load(str(raw), load_external_data=False)
    place_attention_bias(model)
    narrow_index_casts(model)
    _declare_shapes(model, output_shapes or {})
    onnx.external_data_helper.load_external_data_for_model(model, str(work))
    weights = sum(_tensor_bytes(t) for t in model.graph.initializer)
    file = f"{name}.onnx"
    external = f"{file}.data" if weights > external_data_bytes else None
    if external:
        onnx.save_model(model, str(tmp / file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external, size_threshold=1024)
    else:
        onnx.save_model(model, str(tmp / file))
    return GraphSpec(file=file, external_data=external, inputs=_specs(model.graph.input),
                     outputs=_specs(model.graph.output))


def _torchscript_exporter() -> dict:
    """``dynamo=False`` where torch has the switch (2.5+; earlier versions only have this exporter)."""
    import inspect

    import torch

    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def _declare_shapes(model, shapes: dict) -> None:
    """Write the known output shapes (ints, or strings for dynamic dims) into the graph.

    The exporter leaves generated names where reshapes hide a static size; declaring the
    real shapes documents the graph and lets strict shape inference check them.
    """
    for vi in model.graph.output:
        shape = shapes.get(vi.name)
        if shape is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dim = dims.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d


def _tensor_bytes(t) -> int:
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * {1: 4, 10: 2, 16: 2, 6: 4, 7: 8, 9: 1, 11: 8}.get(t.data_type, 4)


def _specs(values) -> list:
    out = []
    for vi in values:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out.append(TensorSpec(vi.name, _NP_NAMES.get(tt.elem_type, str(tt.elem_type)), shape))
    return out


def place_attention_bias(model) -> int:
    """Move the attention bias of every ``com.microsoft.MultiHeadAttention`` to the op's sixth input.

    The decoder's symbolic writes ``(query, key, value, attention_bias)``; the op's inputs 3
    and 4 (``bias``, ``key_padding_mask``) are optional and stay empty. Returns the count.
    """
    nodes = [n for n in model.graph.node if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
    for n in nodes:
        q, k, v, bias = n.input
        del n.input[:]
        n.input.extend([q, k, v, "", "", bias])
    return len(nodes)


def narrow_index_casts(model) -> int:
    """Drop ``Cast(to=int64)`` of an int32 tensor that only feeds index inputs taking int32 (or Shape).

    torch's ``scatter`` needs int64 indices, so the exporter writes ``Cast(int32 -> int64)``
    before ScatterElements; ONNX's Gather, GatherElements and ScatterElements accept int32
    indices, which TensorRT prefers. Returns how many casts were removed.
    """
    import onnx
    from onnx import TensorProto

    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    consumers: dict[str, list] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    outputs = {o.name for o in g.output}
    removed = []
    for node in g.node:
        if node.op_type != "Cast" or node.output[0] in outputs:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        src, dst = node.input[0], node.output[0]
        users = consumers.get(dst, [])
        if to != TensorProto.INT64 or types.get(src) != TensorProto.INT32 or not users:
            continue
        if all(_INDEX_INPUTS.get(u.op_type) == i or _ANY_TYPE_INPUTS.get(u.op_type) == i for u, i in users):
            for u, i in users:
                u.input[i] = src
            removed.append(node)
    for node in removed:
        g.node.remove(node)
    return len(removed)


def _check_all(directory: Path, graphs: dict, lint: bool) -> list:
    """checker (full), strict shape inference against the declared outputs, and (``lint``) the TensorRT lint."""
    import onnx

    from pmod.static.lint import lint_model

    findings = []
    for name, spec in graphs.items():
        path = directory / spec.file
        try:
            onnx.checker.check_model(str(path), full_check=True)
            model = onnx.load(str(path), load_external_data=False)
            inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        except Exception as e:  # noqa: BLE001 - one line, whatever onnx raises
            raise PmodError(f"exported graph {spec.file} fails the ONNX checks "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); report this as a bug") from None
        got = {t.name: t for t in _specs(inferred.graph.output)}
        for t in spec.outputs:
            g = got.get(t.name)
            if g is None or g.dtype != t.dtype or len(g.shape) != len(t.shape):
                raise PmodError(f"exported graph {spec.file}: shape inference disagrees on output '{t.name}' "
                                f"({g and (g.dtype, g.shape)} vs {t.dtype} {t.shape}); report this as a bug")
        if lint:
            findings += lint_model(model, spec.file)
    return findings
