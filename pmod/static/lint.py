"""A TensorRT-compatibility lint for ONNX graphs (static, no TensorRT needed).

Rules (each finding names the graph, node, op and what to change):

``opset``
    The default-domain opset must lie in 9..20, the range the TensorRT 10 ONNX parser
    accepts (onnx-tensorrt ``docs/operators.md``, 10.x). Other domains (``com.microsoft``
    contrib ops, custom ops) are ``unsupported-op``.
``unsupported-op``
    An op outside ``TRT_OPS``: the operators onnx-tensorrt 10.x marks supported
    (``docs/operators.md`` of the 10.1 release). Subgraphs of If/Loop/Scan are checked too.
``topk``
    TopK's K must be a constant (an initializer or a Constant node) below ``TOPK_LIMIT =
    3840`` (onnx-tensorrt's operator table: "K input must be less than 3840"), or computed
    from input *shapes* (pmod's kept-count carriers: TensorRT 10 takes K as a shape tensor;
    the exporter checks those bounds, ``pmod.static.contract.TOPK_STAGE``), with
    ``sorted = 1``. A K computed from tensor values is a finding.
``data-dependent-shape``
    An output shape that depends on tensor *values*: NonZero, Unique, Compress, and any
    shape-like input (Reshape/Expand/Tile shape, Slice starts/ends/steps, ConstantOfShape,
    Range, Pad, OneHot depth, Resize sizes, Split sizes) computed from graph-input data.
    Shapes computed from input *shapes* (Shape -> Gather -> Concat -> Reshape) are fine:
    TensorRT resolves them per optimisation profile.
``constant-input``
    Inputs TensorRT needs as build-time constants: Slice/Squeeze/Unsqueeze/Reduce* axes,
    CumSum axis.
``int64``
    TensorRT runs index and position math in int32. Flagged: int64 graph inputs or
    outputs (bindings should be int32), and int64 *data* tensors (values derived from
    graph inputs) used by anything but Cast, Shape or Size: e.g. TopK/ArgMax indices (int64 by the
    ONNX spec) must be cast to int32 before they index a Gather or ScatterElements.
    int64 shape tensors (constants, Shape outputs and arithmetic on them, the int64 that
    Reshape/Slice/Expand inputs must be by the ONNX spec) are allowed.
``double``
    float64 tensors: TensorRT has only limited double support.

``lint_model`` works on a loaded ``onnx.ModelProto`` (weights not needed: load with
``load_external_data=False``); ``lint_path`` on a ``.onnx`` file or an export directory (a
``--target ort`` export, which uses ONNX Runtime's fused attention, is refused in one line).
``onnx`` is imported only when a graph is linted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pmod.static.contract import TOPK_LIMIT

OPSET_RANGE = (9, 20)

#: ONNX ops TensorRT 10 supports (onnx-tensorrt 10.1, docs/operators.md, "Supported: Y").
TRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

#: Ops whose output shape is data-dependent whatever their inputs.
DATA_SHAPE_OPS = frozenset({"NonZero", "Unique", "Compress"})

#: (op, input positions) that determine an output shape.
SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 4), "ConstantOfShape": (0,),
    "Range": (0, 1, 2), "Pad": (1,), "OneHot": (1,), "Resize": (2, 3), "Upsample": (1,), "Split": (1,),
}

#: (op, input positions) TensorRT needs as build-time constants.
CONSTANT_INPUTS = {
    "Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "CumSum": (1,),
    **{op: (1,) for op in ("ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum", "ReduceProd", "ReduceL1",
                           "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
}

CONST, SHAPE, DATA = 0, 1, 2  # what a tensor's values depend on


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str
    op: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: {self.node} ({self.op}): {self.rule}: {self.message}"


def lint_model(model, name: str = "graph") -> list[Finding]:
    """TensorRT-compatibility findings for one ONNX model (empty: it passes)."""
    import onnx

    out: list[Finding] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        out.append(Finding(name, "model", "-", "opset",
                           f"default-domain opset {opset} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]} "
                           "(TensorRT 10's ONNX parser); export with another opset"))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - lint what we can without inferred types
        inferred = model
    types = _elem_types(inferred.graph)
    g = model.graph
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            out.append(Finding(name, vi.name, "graph I/O", "int64",
                               f"graph {'input' if vi in g.input else 'output'} '{vi.name}' is int64: "
                               "make it int32 (TensorRT bindings)"))
    _lint_graph(g, name, types, out, outer={})
    return out


def _elem_types(graph) -> dict[str, int]:
    types = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def _lint_graph(g, name: str, types: dict[str, int], out: list[Finding], outer: dict[str, int]) -> None:
    import onnx
    from onnx import TensorProto

    kind: dict[str, int] = dict(outer)
    for vi in g.input:
        kind[vi.name] = DATA
    for init in g.initializer:
        kind[init.name] = CONST
    constants = {init.name: init for init in g.initializer}
    producer = {}
    consumers: dict[str, list] = {}
    for node in g.node:
        for o in node.output:
            producer[o] = node
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    for node in g.node:
        label = node.name or (node.output[0] if node.output else node.op_type)
        op = node.op_type
        subgraphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        subgraphs += [sg for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for sg in a.graphs]
        # what the outputs depend on
        if op == "Constant":
            k = CONST
            constants[node.output[0]] = _constant_value(node)
        elif op in ("Shape", "Size"):
            k = SHAPE
        elif subgraphs:
            k = DATA
        else:
            k = max((kind.get(i, CONST) for i in node.input if i), default=CONST)
        for o in node.output:
            kind[o] = k

        if node.domain not in ("", "ai.onnx") or op not in TRT_OPS:
            where = f"domain '{node.domain}'" if node.domain not in ("", "ai.onnx") else "the ONNX-TensorRT parser"
            out.append(Finding(name, label, op, "unsupported-op",
                               f"{op} is not supported by {where}; express it with supported ops"))
        if op in DATA_SHAPE_OPS:
            out.append(Finding(name, label, op, "data-dependent-shape",
                               f"{op}'s output shape depends on input values; use a fixed-size formulation (masks, TopK)"))
        for pos in SHAPE_INPUTS.get(op, ()):
            if pos < len(node.input) and node.input[pos] and kind.get(node.input[pos], CONST) == DATA:
                out.append(Finding(name, label, op, "data-dependent-shape",
                                   f"input {pos} ('{node.input[pos]}') of {op} comes from tensor values, so the "
                                   "output shape is data-dependent; derive it from shapes or constants"))
        for pos in CONSTANT_INPUTS.get(op, ()):
            if pos < len(node.input) and node.input[pos] and node.input[pos] not in constants:
                out.append(Finding(name, label, op, "constant-input",
                                   f"input {pos} ('{node.input[pos]}') of {op} must be a constant for TensorRT"))
        if op == "TopK":
            _check_topk(node, name, label, constants, kind, out)
        if op == "ScatterND" and any(a.name == "reduction" and a.s not in (b"", b"none") for a in node.attribute):
            out.append(Finding(name, label, op, "unsupported-op", "ScatterND 'reduction' is not supported by TensorRT"))
        for o in node.output:
            if types.get(o) == TensorProto.DOUBLE:
                out.append(Finding(name, label, op, "double", f"'{o}' is float64; compute in float32"))
        for sg in subgraphs:
            _lint_graph(sg, name, {**types, **_elem_types(sg)}, out, outer=kind)

    for node in g.node:
        for o in node.output:
            if types.get(o) != TensorProto.INT64 or kind.get(o) != DATA:
                continue
            users = [c for c in consumers.get(o, []) if c.op_type not in ("Cast", "Shape", "Size")]
            if users:
                u = users[0]
                out.append(Finding(name, node.name or o, node.op_type, "int64",
                                   f"int64 data tensor '{o}' feeds {u.op_type} '{u.name or u.output[0]}': "
                                   "cast it to int32 first (TensorRT computes indices in int32)"))


def _constant_value(node):
    """A Constant node's value as a TensorProto (None for sparse or string values)."""
    from onnx import helper, TensorProto

    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name == "value_int":
            return helper.make_tensor("k", TensorProto.INT64, [], [a.i])
        if a.name == "value_ints":
            return helper.make_tensor("k", TensorProto.INT64, [len(a.ints)], list(a.ints))
    return None


def _check_topk(node, name: str, label: str, constants: dict, kind: dict, out: list[Finding]) -> None:
    from onnx import numpy_helper

    attrs = {a.name: a for a in node.attribute}
    if "sorted" in attrs and attrs["sorted"].i == 0:
        out.append(Finding(name, label, "TopK", "topk", "TopK needs sorted=1 for TensorRT"))
    k_name = node.input[1] if len(node.input) > 1 else None
    if k_name is None:  # opset < 10: K is an attribute
        k = attrs["k"].i if "k" in attrs else None
    elif constants.get(k_name) is not None:
        k = int(numpy_helper.to_array(constants[k_name]).reshape(-1)[0])
    elif kind.get(k_name) == SHAPE:
        return  # from input shapes: a shape tensor per optimisation profile (the exporter bounds it)
    else:
        out.append(Finding(name, label, "TopK", "topk",
                           f"TopK's K ('{k_name}') is computed from tensor values; TensorRT needs K from a "
                           "constant or from input shapes (size a carrier input to the count)"))
        return
    if k is not None and k >= TOPK_LIMIT:
        out.append(Finding(name, label, "TopK", "topk",
                           f"TopK K = {k} is not below TensorRT's limit {TOPK_LIMIT}; split the selection"))


def lint_path(path) -> list[Finding]:
    """Lint a ``.onnx`` file, or every graph of an export directory."""
    import onnx

    from pmod.errors import PmodError
    from pmod.static.manifest import MANIFEST

    path = Path(path)
    if path.is_dir():
        _refuse_ort_target(path / MANIFEST)
        files = sorted(path.glob("*.onnx"))
        if not files:
            raise PmodError(f"{path} holds no .onnx files: pass an export directory or a .onnx file")
    elif path.is_file():
        files = [path]
    else:
        raise PmodError(f"{path} does not exist: pass an export directory or a .onnx file")
    findings = []
    for f in files:
        try:
            model = onnx.load(str(f), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - a broken file is one line
            raise PmodError(f"{f} is not a readable ONNX model ({type(e).__name__}); re-export it") from None
        findings += lint_model(model, f.name)
    return findings


def _refuse_ort_target(manifest: Path) -> None:
    """A ``--target ort`` export is for ONNX Runtime (fused contrib attention): say so in one line."""
    import json

    from pmod.errors import PmodError
    from pmod.static.manifest import EXPORT_FORMAT

    try:
        d = json.loads(Path(manifest).read_text())
    except (OSError, ValueError):
        return  # not an export directory (or a broken one): lint its files as they are
    if isinstance(d, dict) and d.get("format") == EXPORT_FORMAT and d.get("target") == "ort":
        raise PmodError(f"{manifest.parent} was exported for ONNX Runtime (--target ort, with its fused attention); "
                        "the lint checks TensorRT graphs: export with 'pmod export onnx --target trt'")
