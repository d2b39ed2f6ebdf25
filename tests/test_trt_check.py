"""check-trt-mllm: exported bundles pass the static TensorRT checks; hand-made bad graphs are caught
node by node, per TensorRT version; plugins are recognised; user errors are one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from mllm_deploy.trt.check import (RESTRICTION_KEYS, SUPPORTED_TRT_VERSIONS, check_bundle, check_graph,
                                          load_support)

VERSIONS = ("10.3", "10.16", "11.4")
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, initializers=(), opset=17, custom=True) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hand", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("mllm_deploy", 1)] if custom else [])
    return helper.make_model(graph, opset_imports=opsets)


def _value(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _int(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


# node name -> a word its finding must contain
BAD_NODES = {
    "topk_unsorted": "sorted=0",
    "topk_big_k": "K=4000",
    "scatter_add": "reduction='add'",
    "nonzero": "data-dependent",
    "cumsum_int": "float data only",
    "plugin_no_attrs": "missing plugin attributes",
    "det": "not supported",
    "if_node/then_branch/nonzero_inside": "data-dependent",
}


def bad_model() -> onnx.ModelProto:
    then_branch = helper.make_graph([helper.make_node("NonZero", ["x"], ["nz_in"], name="nonzero_inside")],
                                    "then", [], [_value("nz_in", I64, None)])
    else_branch = helper.make_graph([helper.make_node("Shape", ["x"], ["shp"], name="shape_else")],
                                    "else", [], [_value("shp", I64, None)])
    nodes = [
        helper.make_node("Relu", ["x"], ["ok"], name="fine_relu"),
        helper.make_node("TopK", ["x", "k2"], ["v1", "i1"], name="topk_unsorted", sorted=0),
        helper.make_node("Constant", [], ["k4000"], name="k_const", value=_int("k4000v", [4000])),
        helper.make_node("TopK", ["big", "k4000"], ["v2", "i2"], name="topk_big_k"),
        helper.make_node("ScatterElements", ["x", "idx", "upd"], ["sc"], name="scatter_add", axis=1, reduction="add"),
        helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
        helper.make_node("CumSum", ["ints", "axis0"], ["cs"], name="cumsum_int"),
        helper.make_node("TokenSelect", ["x"], ["ts"], name="plugin_no_attrs", domain="mllm_deploy", k=1),
        helper.make_node("Det", ["mat"], ["det_out"], name="det"),
        helper.make_node("If", ["cond"], ["branch_out"], name="if_node", then_branch=then_branch,
                         else_branch=else_branch),
        helper.make_node("ScatterElements", ["x", "idx", "upd"], ["sc_ok"], name="scatter_plain", axis=1),
        helper.make_node("TopK", ["x", "k2"], ["v3", "i3"], name="topk_fine", largest=0, sorted=1),
    ]
    inputs = [_value("x", F, [2, 8]), _value("big", F, [1, 5000]), _value("idx", I64, [2, 2]),
              _value("upd", F, [2, 2]), _value("ints", I64, [2, 8]), _value("mat", F, [3, 3]),
              _value("cond", TensorProto.BOOL, [])]
    outputs = [_value(n, F, None) for n in ("ok", "v1", "v2", "sc", "det_out", "sc_ok", "v3")]
    outputs += [_value("cs", I64, None), _value("nz", I64, None), _value("ts", F, None), _value("branch_out", I64, None)]
    return _model(nodes, inputs, outputs, [_int("k2", [2]), _int("axis0", [0])])


def plugin_model() -> onnx.ModelProto:
    node = helper.make_node("TokenSelect", ["s", "vs", "x", "p"], ["y", "py", "rows"], name="select",
                            domain="mllm_deploy", k=2, n_vis=4, plugin_version="1", plugin_namespace="mllm_deploy")
    inputs = [_value("s", F, [4]), _value("vs", I64, [1]), _value("x", F, [1, 6, 8]), _value("p", I64, [1, 6])]
    outputs = [_value("y", F, None), _value("py", I64, None), _value("rows", I64, None)]
    return _model([node], inputs, outputs)


@pytest.fixture()
def bundle_with(tiny_bundles, tmp_path):
    """A copy of a real bundle whose prefill graph is replaced by a hand-made one."""
    def make(model: onnx.ModelProto):
        target = tmp_path / "bundle"
        shutil.copytree(tiny_bundles["gqa56"], target)
        onnx.save(model, target / "prefill.onnx")
        return target
    return make


def test_tables_present_and_keys_known():
    assert SUPPORTED_TRT_VERSIONS == VERSIONS
    for version in VERSIONS:
        table = load_support(version)
        assert table["tensorrt"] == version and table["source"] and table["opset_min"] <= table["opset_max"]
        used = {key for spec in table["ops"].values() for key in spec["restrictions"]}
        assert used <= set(RESTRICTION_KEYS), used - set(RESTRICTION_KEYS)
        assert not set(table["ops"]) & set(table["unsupported"])


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_exported_bundles_pass(tiny_bundles, version):
    for name, bundle in tiny_bundles.items():
        proc = run_cli("check-trt-mllm", str(bundle), "--trt", version)
        assert proc.returncode == 0, (name, proc.stdout, proc.stderr)
        assert proc.stdout.strip().splitlines()[-1].startswith(f"check-trt-mllm: no problems for TensorRT {version}")
        assert check_bundle(bundle, version) == {"vision": [], "prefill": [], "decode": []}


@pytest.mark.parametrize("version", VERSIONS)
def test_bad_graph_flagged_by_node(version):
    findings = check_graph(bad_model(), version)
    flagged = {}
    for f in findings:
        flagged.setdefault(f.node, []).append(f.problem)
    assert set(flagged) == set(BAD_NODES), flagged
    for node, word in BAD_NODES.items():
        assert any(word in problem for problem in flagged[node]), (node, flagged[node])


@pytest.mark.parametrize("version", VERSIONS)
def test_bad_graph_through_cli(bundle_with, version):
    bundle = bundle_with(bad_model())
    proc = run_cli("check-trt-mllm", str(bundle), "--trt", version)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"check-trt-mllm: {len(BAD_NODES)} problems for TensorRT {version}"
    assert "prefill: topk_unsorted (TopK): sorted=0" in proc.stdout
    assert "prefill: plugin_no_attrs (TokenSelect): missing plugin attributes" in proc.stdout
    report = json.loads(run_cli("check-trt-mllm", str(bundle), "--trt", version, "--json").stdout)
    assert report["ok"] is False and report["tensorrt"] == version
    assert {f["node"] for f in report["findings"]} == set(BAD_NODES)


def test_versions_differ_where_the_tables_do():
    """HannWindow arrived in 10.4 and Swish in 11.0; opset 24 is beyond 10.3."""
    nodes = [helper.make_node("HannWindow", ["n"], ["w"], name="hann"),
             helper.make_node("Swish", ["x"], ["y"], name="swish")]
    model = _model(nodes, [_value("n", I64, []), _value("x", F, [4])], [_value("w", F, None), _value("y", F, None)],
                   opset=24, custom=False)
    nodes_by_version = {v: sorted(f.node for f in check_graph(model, v)) for v in VERSIONS}
    assert nodes_by_version == {"10.3": ["(model)", "hann", "swish"], "10.16": ["swish"], "11.4": []}


def test_plugin_recognised(bundle_with):
    assert check_graph(plugin_model(), "10.3") == []
    proc = run_cli("check-trt-mllm", str(bundle_with(plugin_model())), "--trt", "10.3", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report == {**report, "tensorrt": "10.3", "ok": True, "findings": [], "plugins": ["TokenSelect"]}


def test_plugin_library_membership():
    model = plugin_model()
    model.graph.node[0].op_type = "TokenShuffle"
    assert check_graph(model, "11.4") == []  # no library given: any attributed mllm_deploy node is a plugin
    findings = check_graph(model, "11.4", known_plugins={"TokenSelect"})
    assert [(f.node, f.op_type) for f in findings] == [("select", "TokenShuffle")]


@pytest.mark.parametrize("opset, flagged_for", [(8, set(VERSIONS)), (21, {"10.3"}), (17, set())])
def test_opset_range(opset, flagged_for):
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_value("x", F, [2])], [_value("y", F, None)],
                   opset=opset, custom=False)
    for version in VERSIONS:
        findings = check_graph(model, version)
        assert [f.op_type for f in findings] == (["opset_import"] if version in flagged_for else []), version
        if findings:
            assert f"opset {opset}" in findings[0].problem


def test_unknown_version_is_one_line(tiny_bundles):
    proc = run_cli("check-trt-mllm", str(tiny_bundles["gqa56"]), "--trt", "9.2")
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "'9.2'" in lines[0] and "10.3, 10.16, 11.4" in lines[0]


def test_missing_bundle_is_one_line(tmp_path):
    proc = run_cli("check-trt-mllm", str(tmp_path / "nope"), "--trt", "10.16")
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bundle directory not found" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_shape_tensor_inputs_are_listed_and_an_unsized_one_is_flagged(tiny_bundles, bundle_with):
    """image_start is a shape tensor build-mllm can size (listed, not a problem); a made-up input that feeds a
    Reshape's shape has no range build-mllm could derive (a finding naming the slot)."""
    proc = run_cli("check-trt-mllm", str(tiny_bundles["gqa56"]), "--trt", "10.3", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["shape_inputs"] == {"prefill": ["image_start"]}
    assert "prefill input image_start: TensorRT shape tensor" in run_cli(
        "check-trt-mllm", str(tiny_bundles["gqa56"]), "--trt", "10.3").stderr
    nodes = [helper.make_node("Add", ["n", "one"], ["n1"], name="add"),
             helper.make_node("Concat", ["n1", "one"], ["shape"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape"),
             helper.make_node("Shape", ["x"], ["xs"], name="shape_only"),
             helper.make_node("Reshape", ["x", "xs"], ["z"], name="reshape_by_shape")]
    model = _model(nodes, [_value("x", F, [2, 8]), _value("n", I64, [1]), _value("m", I64, [1])],
                   [_value("y", F, None), _value("z", F, None)], [_int("one", [1])])
    proc = run_cli("check-trt-mllm", str(bundle_with(model)), "--trt", "10.16", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["shape_inputs"] == {"prefill": ["n"]}  # x reaches a shape through Shape only
    assert [(f["node"], f["op_type"]) for f in report["findings"]] == [("n", "input")]
    assert "Reshape input 1 at reshape" in report["findings"][0]["problem"]
