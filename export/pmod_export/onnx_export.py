"""``pmod export onnx``: a pmod checkpoint -> ONNX graphs + manifest, checked and linted.

Graphs (``docs/EXPORT.md`` has their inputs and outputs):

* ``embed``: token ids -> embeddings (the table lives here once).
* ``vision``: pixels + the packing index ``ImageInput.feature_index()`` -> image tokens.
* ``prefill``: the static decoder for ``N = --max-vision-tokens`` vision slots.
* ``decode``: the same decoder with no vision stream (decode steps, text-only chunks).

Export uses torch's TorchScript-based ONNX exporter (``dynamo=False``): it ships with
every torch pmod supports (>= 2.2) and needs no onnxscript; torch 2.9+ marks it
deprecated, so its warning is silenced here. Each graph is then post-processed
(``narrow_index_casts``), saved (weights as external data past
``external_data_bytes``), checked with ``onnx.checker.check_model(full_check=True)``,
shape-inferred (strict) and linted; any failure leaves no output directory
(``pmod.format.atomic_dir``).
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
from pmod.schedule import capacities, check_retention, layer_ratios

OPSET = 17
EXPORT_DTYPES = ("float32", "float16")
#: Graphs whose weights pass this many bytes keep them in ``<graph>.onnx.data``
#: (protobuf cannot hold more than 2 GiB in one file).
EXTERNAL_DATA_BYTES = 1 << 30
_NP_NAMES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 9: "bool", 11: "float64", 16: "bfloat16"}
_INDEX_INPUTS = {"Gather": 1, "GatherElements": 1, "ScatterElements": 1}
_ANY_TYPE_INPUTS = {"Shape": 0, "Size": 0}  # read only the shape


def kv_names(layer: int, prefix: str) -> list[str]:
    """``past_key_l, past_value_l, past_positions_l`` (prefix ``past``) or ``new_*``."""
    return [f"{prefix}_key_{layer}", f"{prefix}_value_{layer}", f"{prefix}_positions_{layer}"]


def one_image_vision_tokens(config) -> int:
    """Routed vision tokens of the largest single image the model takes (the default N).

    LLaVA-1.5: one tile's rows. LLaVA-NeXT anyres: the grid (a pinpoint) whose packed map,
    uncropped, is the largest, under the model's ``mod_target_token_type``; the plan and the
    routed mask are pmod.image's.
    """
    from pmod.image import ImageInput, anyres_plan, grid_pinpoints, layout, patches_per_side, pack_plan
    from pmod.image import tokens_per_tile as per_tile

    if config.vision_config is None or config.mm_projector_type is None:
        return 0
    tile, P = int(config.vision_config["image_size"]), patches_per_side(config)
    if layout(config) == "anyres":
        cases = [((w, h), (w // tile, h // tile), anyres_plan((w, h), (w // tile, h // tile), P), P * P)
                 for w, h in grid_pinpoints(config)]
    else:
        cases = [((tile, tile), None, pack_plan((tile, tile), config), 0)]
    best = 0
    for size, grid, plan, base in cases:
        tiles = 1 + (grid[0] * grid[1] if grid else 0)
        image = ImageInput(np.zeros((tiles, 1, 1, 1), np.float32), size, grid, plan, base, per_tile(config))
        best = max(best, int(image.routed_mask(config.mod_target_token_type).sum()))
    return best


def export_onnx(model_dir, out_dir, max_vision_tokens: int | None = None, dtype: str = "float32",
                max_context: int | None = None, external_data_bytes: int | None = None,
                retention: float = 1.0) -> Path:
    """Export a pmod checkpoint to ``out_dir`` (which must not exist); return its path.

    ``max_vision_tokens`` (N) defaults to :func:`one_image_vision_tokens`. ``retention``
    scales every MoD layer's ratio (``pmod.schedule.layer_ratios``); the capacities are
    static, so the graphs are built for it and the manifest records it.
    ``external_data_bytes``: a graph whose weights exceed it stores them in
    ``<graph>.onnx.data`` (default ``EXTERNAL_DATA_BYTES``).
    """
    config = read_config(model_dir)  # cheap checks before the weights load
    require_float(config, model_dir, "pmod export onnx")
    retention = check_retention(retention)
    N = one_image_vision_tokens(config) if max_vision_tokens is None else max_vision_tokens
    if not isinstance(N, int) or isinstance(N, bool) or N < 0:
        raise PmodError(f"--max-vision-tokens must be a non-negative integer, got {N!r}")
    if dtype not in EXPORT_DTYPES:
        raise PmodError(f"--dtype {dtype!r} is not supported for ONNX export: choose one of {', '.join(EXPORT_DTYPES)}")
    limit = config.max_position_embeddings
    T = limit if max_context is None else max_context
    if not isinstance(T, int) or not 0 < T <= limit:
        raise PmodError(f"--max-context must be in 1..{limit} (max_position_embeddings), got {T!r}")
    if N > T:
        raise PmodError(f"--max-vision-tokens {N} exceeds the context of {T} tokens; lower it or raise --max-context")
    if N and config.mm_projector_type is None:
        raise PmodError(f"{model_dir} is a text-only model (no mm_projector_type): export it with --max-vision-tokens 0")
    if out_dir is not None and Path(out_dir).exists():
        raise PmodError(f"output {out_dir} already exists; remove it or choose another path")

    from . import torch_loader  # before torch, see there
    import torch

    torch_loader.check()

    from .manifest import GraphSpec, Manifest
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
        where = dict(tmp=tmp, work=work, external_data_bytes=external_data_bytes)
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

        for name, n_slots in (("prefill", N), ("decode", 0)):
            if n_slots or name == "decode":
                decoder = model.decoder(n_slots, T, retention)
                graphs[name] = _export_graph(decoder, *_decoder_example(config, decoder, tdtype, T), name=name, **where)
        shutil.rmtree(work)

        source = Path(model_dir)
        for f in TOKENIZER_FILES + (PREPROCESSOR_FILE,):
            if (source / f).is_file():
                shutil.copy2(source / f, tmp / f)
        manifest = Manifest(
            dtype=dtype, max_vision_tokens=N, max_context=T, opset=OPSET, capacities=capacities(config, N, retention),
            layer_ratios=layer_ratios(config, retention), retention=retention,
            kv={"num_layers": config.num_hidden_layers, "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
                "layout": "[1, entries, num_key_value_heads, head_dim], positions int32 [1, entries]"},
            config=config.to_dict(), graphs=graphs)
        findings = _check_all(tmp, graphs)
        if findings:
            raise PmodError(f"the exported graphs fail the TensorRT-compatibility lint ({len(findings)} "
                            f"finding(s), first: {findings[0]}); report this as a bug")
        manifest.lint = {"rules": "pmod_export.lint", "findings": 0, "graphs": sorted(graphs)}
        manifest.write(tmp)
    return Path(out_dir)


def _decoder_example(config, decoder, dtype, max_context: int):
    """Example inputs, input/output names, dynamic axes and output shapes of a decoder graph."""
    import torch

    N, H = decoder.N, config.hidden_size
    at = lambda n: torch.arange(n, dtype=torch.int32)[None] % max_context  # noqa: E731 - any valid positions
    args = [torch.zeros(1, 3, H, dtype=dtype), at(3)]
    inputs = ["text_embeds", "text_positions"]
    axes = {"text_embeds": {1: "text_len"}, "text_positions": {1: "text_len"}}
    if N:
        args += [torch.zeros(1, N, H, dtype=dtype), at(N), torch.tensor([N], dtype=torch.int32)]
        inputs += ["vision_embeds", "vision_positions", "n_vision"]
    outputs, shapes = ["logits"], {"logits": [1, config.vocab_size]}
    kv_dims = [config.num_key_value_heads, config.head_dim]
    for l, extra in enumerate(decoder.slot_counts(0)):  # S_l = text_len + C_l
        args += [torch.zeros([1, 2] + kv_dims, dtype=dtype), torch.zeros([1, 2] + kv_dims, dtype=dtype), at(2)]
        inputs += kv_names(l, "past")
        outputs += kv_names(l, "new")
        slots = f"text_len+{extra}" if extra else "text_len"
        axes.update({n: {1: f"past_len_{l}"} for n in kv_names(l, "past")})
        axes.update({n: {1: slots} for n in kv_names(l, "new")})
        k, v, p = kv_names(l, "new")
        shapes.update({k: [1, slots] + kv_dims, v: [1, slots] + kv_dims, p: [1, slots]})
    return tuple(args), inputs, outputs, axes, shapes


def _export_graph(module, args, inputs, outputs, axes, output_shapes=None, *, name, tmp: Path, work: Path,
                  external_data_bytes: int):
    import onnx
    import torch

    from .manifest import GraphSpec

    raw = work / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation, tracer notes
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(module, args, str(raw), opset_version=OPSET, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=True,
                              **_torchscript_exporter())
    # Past 2 GiB torch writes the weights as files next to ``raw``: edit the graph without
    # them (shape inference cannot take a >2 GiB message), then attach them to save.
    model = onnx.load(str(raw), load_external_data=False)
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
    from .manifest import TensorSpec

    out = []
    for vi in values:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out.append(TensorSpec(vi.name, _NP_NAMES.get(tt.elem_type, str(tt.elem_type)), shape))
    return out


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


def _check_all(directory: Path, graphs: dict) -> list:
    """checker (full), strict shape inference against the declared outputs, and the lint."""
    import onnx

    from .lint import lint_model

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
        findings += lint_model(model, spec.file)
    return findings
