"""pmod.static.lint: each TensorRT-compatibility rule on small hand-built ONNX graphs.

The exported p-MoD graphs passing the lint is checked in test_export.py (on real exports).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pmod.app.cli import main  # noqa: E402
from pmod.errors import PmodError  # noqa: E402
from pmod.static.contract import TOPK_LIMIT  # noqa: E402
from pmod.static.lint import lint_model, lint_path  # noqa: E402

F, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def model(nodes, inputs, outputs, initializers=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def rules(m) -> list[str]:
    return sorted({f.rule for f in lint_model(m, "t.onnx")})


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def const(name, value, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def topk_model(k_from_input=False, k=3, sorted_=1, cast=True, k_from_shape=False):
    """x [1, N] -> top-k values and indices (int32 after a Cast, or raw int64).

    K: a constant ``k``, an int64 input's *value* (``k_from_input``) or the length of a bool
    carrier input (``k_from_shape``, pmod's kept-count carriers).
    """
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=sorted_)]
    outputs = [vi("v", F, [1, k])]
    if cast:
        nodes.append(helper.make_node("Cast", ["i"], ["i32"], to=I32))
        outputs.append(vi("i32", I32, [1, k]))
    else:  # int64 indices straight into a Gather
        nodes.append(helper.make_node("Gather", ["x", "i"], ["g"], axis=1))
        outputs.append(vi("g", F, None))
    inputs = [vi("x", F, [1, 5000])]
    inits = []
    if k_from_input:
        inputs.append(vi("k", I64, [1]))
    elif k_from_shape:
        inputs.append(vi("keep", TensorProto.BOOL, ["kept"]))
        nodes[:0] = [helper.make_node("Shape", ["keep"], ["k"])]
    else:
        inits.append(const("k", [k]))
    return model(nodes, inputs, outputs, inits)


def test_constant_topk_passes():
    assert lint_model(topk_model()) == []


def test_topk_k_from_values_fails_from_shapes_passes():
    findings = lint_model(topk_model(k_from_input=True), "bad.onnx")
    assert any(f.rule == "topk" and "computed from tensor values" in f.message for f in findings)
    assert any(f.rule == "int64" and f.op == "graph I/O" for f in findings)  # the int64 K input
    assert "bad.onnx" in str(findings[0])
    assert lint_model(topk_model(k_from_shape=True)) == []  # K = the carrier's length: a shape tensor


def test_topk_limit_and_sorted():
    """TensorRT's parser: "K input must be less than 3840"."""
    assert TOPK_LIMIT == 3840
    assert rules(topk_model(k=TOPK_LIMIT - 1)) == []
    findings = lint_model(topk_model(k=TOPK_LIMIT))
    assert [f.rule for f in findings] == ["topk"] and "not below" in findings[0].message
    assert rules(topk_model(sorted_=0)) == ["topk"]


def test_int64_indices_into_gather_fail():
    findings = lint_model(topk_model(cast=False))
    assert [f.rule for f in findings] == ["int64"]
    assert "Gather" in findings[0].message


def test_data_dependent_shapes():
    nz = model([helper.make_node("NonZero", ["x"], ["y"])], [vi("x", F, [4])], [vi("y", I64, None)])
    assert "data-dependent-shape" in rules(nz)
    # Reshape whose target shape is computed from tensor values
    data = model([helper.make_node("Cast", ["s"], ["s64"], to=I64),
                  helper.make_node("Reshape", ["x", "s64"], ["y"])],
                 [vi("x", F, [4]), vi("s", I32, [2])], [vi("y", F, None)])
    assert rules(data) == ["data-dependent-shape", "int64"]
    # the same shape computed from the input's shape is fine
    shaped = model([helper.make_node("Shape", ["x"], ["s"]),
                    helper.make_node("Concat", ["one", "s"], ["s2"], axis=0),
                    helper.make_node("Reshape", ["x", "s2"], ["y"])],
                   [vi("x", F, ["n"])], [vi("y", F, None)], [const("one", [1])])
    assert lint_model(shaped) == []


def test_unsupported_ops_opset_and_double():
    uniq = model([helper.make_node("Unique", ["x"], ["y"])], [vi("x", F, [4])], [vi("y", F, None)])
    assert rules(uniq) == ["data-dependent-shape", "unsupported-op"]
    contrib = model([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")],
                    [vi("x", F, [4])], [vi("y", F, [4])])
    contrib.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert rules(contrib) == ["unsupported-op"]
    ident = model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", F, [4])], [vi("y", F, [4])], opset=21)
    assert rules(ident) == ["opset"]
    dbl = model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE),
                 helper.make_node("Cast", ["y"], ["z"], to=F)], [vi("x", F, [4])], [vi("z", F, [4])])
    assert rules(dbl) == ["double"]


def test_constant_axes():
    m = model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])],
              [vi("x", F, [4]), vi("axes", I32, [1])], [vi("y", F, None)])
    assert "constant-input" in rules(m)


def test_lint_path_and_cli(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    onnx.save(topk_model(k_from_input=True), str(bad))
    assert any(f.rule == "topk" for f in lint_path(bad))
    assert main(["export", "lint", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert "bad.onnx" in out and "topk" in out and "TensorRT-compatibility problem" in err
    good = tmp_path / "good"
    good.mkdir()
    onnx.save(topk_model(), str(good / "a.onnx"))
    assert main(["export", "lint", str(good)]) == 0
    with pytest.raises(PmodError, match="no .onnx files"):
        lint_path(_empty(tmp_path))
    with pytest.raises(PmodError, match="does not exist"):
        lint_path(tmp_path / "missing")
    (good / "manifest.json").write_text('{"format": "pmod-onnx", "target": "ort"}')
    with pytest.raises(PmodError, match="exported for ONNX Runtime .--target ort.*--target trt"):
        lint_path(good)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d
