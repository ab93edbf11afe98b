"""``pmod trt build``: TensorRT engines from an ONNX export directory, with their manifest.

Steps (docs/TENSORRT.md): check the arguments and the export's manifest (a ``--target trt``
export); load TensorRT and find the GPU (either missing: one line, exit 2, nothing written);
run the TensorRT-compatibility lint (:mod:`pmod.static.lint`) and stop on any finding; then,
inside a temporary directory that becomes ``--out`` only on success
(``pmod.format.atomic_dir``), parse each graph, give it its optimisation profiles
(:mod:`pmod_trt.profiles`), build and serialise it with one timing cache shared by all
graphs, and write ``manifest.json``, the timing cache and the tokenizer / preprocessor files
(so the directory is all ``pmod generate --backend trt`` needs).

Precision (:func:`build_plan`):

* ``fp32``: a float32 export, built as a strongly typed network (the graph's types, no
  reduced precision anywhere), TF32 off.
* ``fp16``: a float16 export (``pmod export onnx --dtype float16``), strongly typed: TensorRT
  follows the graph's own types, so the RMSNorm statistics and router logits the graph
  computes in float32 stay float32.
* ``bf16``: a float32 export built weakly typed with the BF16 builder flag (TensorRT 10's
  weak typing; pmod writes no bfloat16 graphs), on compute capability 8.0 or newer; the
  norms (by name, :func:`keep_fp32`) and every node along the data flow from each router to
  its TopK and its token weights (:func:`routing_nodes`) are pinned to float32, so routing
  decisions see float32 scores.

TF32 is disabled in every case: router scores decide which tokens a layer keeps, and the
fp32 engines are meant to match ONNX Runtime to 1e-3.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from pmod.errors import PmodError
from pmod.format import TOKENIZER_FILES, atomic_dir
from pmod.image import PREPROCESSOR_FILE
from pmod.static.manifest import ENGINE_FORMAT

from . import cuda, deps
from .manifest import read_trt_export
from .profiles import graph_profiles

PRECISIONS = ("fp32", "fp16", "bf16")
TIMING_CACHE = "timing.cache"
#: Build order: the small graphs first, so a broken setup fails fast; then the prefill graph(s)
#: (``prefill``, or one ``prefill_B`` per bucket, in the export's order).
ORDER = ("embed", "vision", "decode")
_WHAT = "pmod trt build"


@dataclass(frozen=True)
class BuildPlan:
    precision: str
    strongly_typed: bool
    flag: str | None  # builder flag for weak typing ("BF16"), None when strongly typed
    pin_fp32: bool  # pin keep_fp32 layers to float32 (weak typing only)


def build_plan(precision: str, export_dtype: str) -> BuildPlan:
    """How to build ``precision`` engines from an export in ``export_dtype`` (one-line errors otherwise)."""
    if precision not in PRECISIONS:
        raise PmodError(f"--precision {precision!r} is not supported: choose one of {', '.join(PRECISIONS)}")
    need = {"fp32": "float32", "fp16": "float16", "bf16": "float32"}[precision]
    if export_dtype != need:
        why = {"fp32": "fp32 engines need a float32 export",
               "fp16": "fp16 engines are built strongly typed from a float16 export",
               "bf16": "bf16 engines are built from a float32 export"}[precision]
        raise PmodError(f"the export is {export_dtype}; {why}: re-export with 'pmod export onnx --dtype {need}'")
    if precision == "bf16":
        return BuildPlan(precision, strongly_typed=False, flag="BF16", pin_fp32=True)
    return BuildPlan(precision, strongly_typed=True, flag=None, pin_fp32=False)


def keep_fp32(layer_name: str) -> bool:
    """Whether a layer (named after its ONNX node, e.g. ``/lm/layers.3/post_attention_layernorm/Pow``) is a norm.

    RMSNorm (``*layernorm*``, ``norm``) and CLIP's ``layer_norm`` / ``layrnorm`` scopes: their
    statistics stay float32. Routing is pinned by data flow (:func:`routing_nodes`), not by name.
    """
    scopes = [p for p in layer_name.split("/") if p][:-1]
    for s in scopes:
        base = s.rsplit("_", 1)[0] if s.rsplit("_", 1)[-1].isdigit() else s
        if "layernorm" in s or "layer_norm" in s or "layrnorm" in s or base == "norm":
            return True
    return False


#: Ops that carry router scores on without mixing in hidden states (their other inputs are
#: constants or non-float tensors: masks, indices).
_ROUTING_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Tanh", "Sigmoid", "Squeeze", "Unsqueeze", "Reshape",
                          "Gather", "Where", "Cast", "Concat", "ScatterElements", "TopK", "Identity", "Flatten"})


def routing_nodes(model) -> set[str]:
    """Names of the nodes along the data flow from every router to its TopK and token weights.

    Routers are the MatMul/Gemm nodes with a weight initializer of one output feature. From
    them the flow follows consumers in ``_ROUTING_OPS`` whose other inputs are initializers,
    constants, non-float tensors or themselves on the flow (so it stops where scores meet
    the hidden states, ``w * x``), and ends at each TopK: the score Squeeze, the padding
    Where, the masking scatter of split selections, the casts and the weight function all
    stay float32.
    """
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = set(inits)  # tensors computed from constants and shapes only (nodes come in topological order)
    for n in g.node:
        if n.op_type in ("Constant", "Shape", "Size") or all(i in consts for i in n.input if i):
            consts.update(n.output)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info) + list(g.input)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def is_router(n) -> bool:
        w = inits.get(n.input[1]) if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 else None
        return w is not None and 1 in numpy_helper.to_array(w).shape[-1:]

    flow = {n.name: n for n in g.node if is_router(n)}
    tensors = {o for n in flow.values() for o in n.output}
    frontier = list(flow.values())
    while frontier:
        node = frontier.pop()
        if node.op_type == "TopK":
            continue  # the selection's indices leave the float flow
        for out in node.output:
            for c in consumers.get(out, []):
                if c.name in flow or c.op_type not in _ROUTING_OPS:
                    continue
                others = [i for i in c.input if i and i not in tensors]
                if all(i in consts or types.get(i) not in floats for i in others):
                    flow[c.name] = c
                    tensors.update(c.output)
                    frontier.append(c)
    return set(flow)


def run_lint(onnx_dir: Path) -> None:
    """The TensorRT-compatibility lint of every graph; any finding stops the build before TensorRT runs."""
    from pmod.static.lint import lint_path

    findings = lint_path(onnx_dir)
    if findings:
        raise PmodError(f"{onnx_dir} fails the TensorRT-compatibility lint ({len(findings)} finding(s), first: "
                        f"{findings[0]}); nothing was built: 'pmod export lint {onnx_dir}' lists them")


def build_engines(onnx_dir, out_dir, precision: str = "fp32", workspace_gb: float | None = None,
                  timing_cache=None, progress: bool = True) -> Path:
    """Build one TensorRT engine per graph of the export ``onnx_dir`` into ``out_dir`` (must not exist).

    ``workspace_gb``: the builder's workspace memory pool limit (default: TensorRT's).
    ``timing_cache``: a file to start the timing cache from (when it exists) and to update.
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    if workspace_gb is not None and not (isinstance(workspace_gb, (int, float)) and workspace_gb > 0):
        raise PmodError(f"--workspace must be a positive number of GiB, got {workspace_gb!r}")
    if out_dir.exists():
        raise PmodError(f"output {out_dir} already exists; remove it or choose another path")
    export = read_trt_export(onnx_dir)
    plan = build_plan(precision, export.dtype)  # the checks that need no TensorRT, before loading it
    trt = deps.tensorrt(_WHAT)
    gpu = cuda.gpu_info(_WHAT)
    if precision == "bf16" and deps.version_tuple(gpu["compute_capability"]) < (8, 0):
        raise PmodError(f"bf16 needs compute capability 8.0 or newer; {gpu['name']} has {gpu['compute_capability']}: "
                        "use --precision fp16")
    profiles = {g: graph_profiles(export, g) for g in export.graphs}  # before the lint: cheap, may refuse
    run_lint(onnx_dir)

    from tqdm import tqdm

    log = deps.logger(trt)
    builder = trt.Builder(log)
    cache_in = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_in.read_bytes() if cache_in and cache_in.is_file() else b""
    graphs = [g for g in ORDER if g in export.graphs] + [g for g in export.graphs if g not in ORDER]
    engines = {}
    cache = None
    with atomic_dir(out_dir) as tmp:
        with tqdm(total=len(graphs), unit="engine", desc="TensorRT", disable=not progress, file=sys.stderr) as bar:
            for g in graphs:
                bar.set_postfix_str(f"{g} ({precision})")
                spec = export.graphs[g]
                config = builder.create_builder_config()
                if cache is None:
                    cache = config.create_timing_cache(cache_bytes)
                    if cache is None:
                        raise PmodError(f"TensorRT cannot read the timing cache {cache_in}: pass another "
                                        "--timing-cache or none")
                _configure(trt, config, plan, workspace_gb, cache)
                network, parser = _parse(trt, builder, log, onnx_dir / spec.file, plan)  # parser: alive until built
                _add_profiles(log, builder, config, network, profiles[g], g)
                del log.errors[:]
                serialized = builder.build_serialized_network(network, config)
                if serialized is None:
                    why = log.errors[-1] if log.errors else "no error was logged"
                    raise PmodError(f"TensorRT could not build the {g} engine ({why}); nothing was written")
                file = f"{g}.engine"
                with open(tmp / file, "wb") as f:
                    f.write(serialized)
                engines[g] = replace(spec, file=file, external_data=None, source=spec.file,
                                     profiles=[p.to_dict() for p in profiles[g]])
                del network, parser, config, serialized
                bar.update(1)
        cache_data = bytes(memoryview(cache.serialize())) if cache is not None else b""
        (tmp / TIMING_CACHE).write_bytes(cache_data)
        for f in TOKENIZER_FILES + (PREPROCESSOR_FILE,):
            if (onnx_dir / f).is_file() and not (tmp / f).exists():
                shutil.copy2(onnx_dir / f, tmp / f)
        replace(export, format=ENGINE_FORMAT, graphs={g: engines[g] for g in graphs}, engine={
            "tensorrt_version": str(trt.__version__), "gpu": gpu, "precision": precision,
            "build": {"strongly_typed": plan.strongly_typed, "flag": plan.flag, "workspace_gb": workspace_gb,
                      "timing_cache": TIMING_CACHE, "tf32": False, "source": str(onnx_dir.resolve())}}).write(tmp)
    if cache_in is not None:
        part = cache_in.with_name(cache_in.name + ".tmp")
        part.write_bytes(cache_data)
        os.replace(part, cache_in)
    return out_dir


def _configure(trt, config, plan: BuildPlan, workspace_gb, cache) -> None:
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)
    if plan.flag is not None:
        flag = getattr(trt.BuilderFlag, plan.flag, None)
        if flag is None:
            raise PmodError(f"TensorRT {trt.__version__} has no {plan.flag} builder flag: use --precision fp16 "
                            "with a float16 export")
        config.set_flag(flag)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    # Let the runtime size activation memory to the shapes of each run (TensorRT 10.10+;
    # earlier 10.x size it per profile), with the user-managed memory pmod_trt.engine gives.
    resize = getattr(getattr(trt, "PreviewFeature", None), "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if resize is not None:
        config.set_preview_feature(resize, True)
    if config.set_timing_cache(cache, False) is False:
        raise PmodError("TensorRT refused the timing cache (made by another TensorRT version or GPU?): "
                        "pass another --timing-cache or none")


def _parse(trt, builder, log, path: Path, plan: BuildPlan):
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0] if errors and errors[0] else "no error reported"
        raise PmodError(f"TensorRT's ONNX parser rejects {path.name} ({len(errors)} error(s), first: {first}); "
                        "check it with 'pmod export lint' and re-export it")
    if plan.pin_fp32:
        import onnx

        routing = routing_nodes(onnx.load(str(path), load_external_data=False))
        floats = {trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float16)}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            pinned = layer.name in routing or keep_fp32(layer.name)
            if not pinned or layer.num_outputs == 0 or layer.get_output(0).dtype not in floats:
                continue
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in floats:
                    layer.set_output_type(j, trt.float32)
    return network, parser


def _parser_error(error) -> str:
    """One line of an ``IParserError``: its node, when it names one, and its description."""
    desc = error.desc() if hasattr(error, "desc") else str(error)
    node = error.node_name() if hasattr(error, "node_name") else ""
    return (f"node {node}: {desc}" if node else str(desc)).strip()


def _add_profiles(log, builder, config, network, profiles, graph: str) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t.name for t in inputs if any(int(d) < 0 for d in t.shape)]
    names = {t.name for t in inputs}
    for p in profiles:
        missing = [n for n in dynamic if n not in p.shapes]
        unknown = [n for n in p.shapes if n not in names]
        if missing or unknown:
            raise PmodError(f"the {graph} graph does not match its manifest: input "
                            f"'{(missing or unknown)[0]}' {'has no profile' if missing else 'is not in the graph'}; "
                            "re-export it with 'pmod export onnx'")
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            why = f" ({log.errors[-1]})" if log.errors else ""
            raise PmodError(f"TensorRT refused the '{p.name}' optimisation profile of the {graph} graph{why}")
