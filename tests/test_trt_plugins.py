"""The TensorRT plugin glue (plugins/trt) and its Python mirror (plugins/trt_fields.py) agree:
creator field names and types, serialised bytes, entry points. The glue itself compiles only
against TensorRT's headers, which CI does not have; these checks read its source."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from mllm_deploy.plugins.ops import ATTRIBUTES, OP_NAMES
from mllm_deploy.plugins.trt_fields import (FIELD_TYPES, PluginFieldType, PluginFieldValue, decode_fields,
                                            encode_fields, plugin_key)

PLUGIN_SOURCE = Path(__file__).resolve().parents[1] / "plugins" / "trt" / "routing_plugins.cpp"
CMAKE = Path(__file__).resolve().parents[1] / "plugins" / "CMakeLists.txt"


def creator_fields_in_source() -> dict[str, list[tuple[str, str]]]:
    """op -> [(field, kTYPE)] as each C++ creator declares them (RoutingCreator creator("Op", {...}, make...))."""
    text = PLUGIN_SOURCE.read_text()
    out = {}
    for op, body in re.findall(r'static RoutingCreator creator\("(\w+)",\s*\{(.*?)\},\s*make\w+\)', text, flags=re.S):
        out[op] = re.findall(r'PluginField\("(\w+)", nullptr, PluginFieldType::(k\w+)', body)
    return out


def serialised_fields_in_source() -> dict[str, list[tuple[str, str]]]:
    """class -> [(field, kTYPE)] as addFields() writes them into the engine."""
    text = PLUGIN_SOURCE.read_text()
    out = {}
    for cls, body in re.findall(r"class (\w+)Plugin final.*?void addFields\(std::vector<PluginField>& \w*(?:/\*\w+\*/)?\)"
                                r" override\s*\{(.*?)\n    \}", text, flags=re.S):
        out[cls] = re.findall(r'emplace_back\("(\w+)", [^;]*?PluginFieldType::(k\w+)', body, flags=re.S)
    return out


def test_creators_declare_exactly_the_python_field_table():
    declared = creator_fields_in_source()
    assert set(declared) == set(OP_NAMES)
    for op in OP_NAMES:
        assert declared[op] == [(name, "k" + kind.name) for name, kind in FIELD_TYPES[op]], op
        assert [name for name, _ in declared[op]] == list(ATTRIBUTES[op])  # the ONNX attribute names, in order


def test_plugins_serialise_the_fields_their_creators_read():
    written = serialised_fields_in_source()
    assert set(written) == set(OP_NAMES)
    for op in OP_NAMES:
        assert written[op] == [(name, "k" + kind.name) for name, kind in FIELD_TYPES[op]], op


def test_library_entry_points_and_identity():
    text = PLUGIN_SOURCE.read_text()
    assert re.search(r'extern "C"', text)
    assert re.search(r"void setLoggerFinder\(nvinfer1::ILoggerFinder\* \w+\)", text)
    assert re.search(r"nvinfer1::IPluginCreatorInterface\* const\* getCreators\(int32_t& \w+\)", text)
    assert 'kPluginNamespace = "mllm_deploy"' in text and 'kPluginVersion = "1"' in text
    for base in ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuild", "IPluginV3OneRuntime", "IPluginCreatorV3One"):
        assert base in text
    cmake = CMAKE.read_text()
    assert "nvinfer" not in re.sub(r"#.*", "", cmake).replace("NvInferRuntime.h", "")  # headers only, no libnvinfer


def test_encode_fields_types_and_bytes():
    attrs = {"n_vis": 576, "query_rows": "visual_and_text", "head_reduction": "max", "combine": "self_times_cross",
             "scale": 0.08838834764831845, "plugin_version": "1", "plugin_namespace": "mllm_deploy"}
    fields = encode_fields("VisualScore", attrs)
    assert [f.name for f in fields] == ["n_vis", "query_rows", "head_reduction", "combine", "scale"]
    assert fields[0] == PluginFieldValue("n_vis", PluginFieldType.INT32, struct.pack("<i", 576), 1)
    assert fields[1] == PluginFieldValue("query_rows", PluginFieldType.CHAR, b"visual_and_text", 15)  # no NUL
    assert fields[4].type is PluginFieldType.FLOAT32 and len(fields[4].data) == 4
    assert decode_fields("VisualScore", fields)["scale"] == struct.unpack("<f", struct.pack("<f", 0.08838834764831845))[0]
    with_nul = [PluginFieldValue(f.name, f.type, f.data + b"\0", f.length + 1) if f.type is PluginFieldType.CHAR else f
                for f in fields]
    assert decode_fields("VisualScore", with_nul)["query_rows"] == "visual_and_text"  # a parser may count the NUL
    assert encode_fields("TokenScatter", {"plugin_version": "1", "plugin_namespace": "mllm_deploy"}) == []
    assert plugin_key("TokenSelect", {}) == ("TokenSelect", "1", "")  # the parser's defaults


@pytest.mark.parametrize("attrs, match", [
    ({"k": 2}, "'n_vis' is missing"),
    ({"k": 2**31, "n_vis": 4}, "does not fit INT32"),
    ({"k": 2, "n_vis": 4, "plugin_namespace": ""}, "do not name the mllm_deploy plugin"),
])
def test_encode_fields_refuses(attrs, match):
    full = {"plugin_version": "1", "plugin_namespace": "mllm_deploy", **attrs}
    with pytest.raises(ValueError, match=match):
        encode_fields("TokenSelect", full)


def test_decode_fields_refuses_wrong_types():
    fields = encode_fields("TokenSelect", {"k": 2, "n_vis": 4, "plugin_version": "1", "plugin_namespace": "mllm_deploy"})
    wrong = [PluginFieldValue("k", PluginFieldType.FLOAT32, fields[0].data, 1), fields[1]]
    with pytest.raises(ValueError, match="the creator reads INT32"):
        decode_fields("TokenSelect", wrong)
    with pytest.raises(ValueError, match="'n_vis' is missing"):
        decode_fields("TokenSelect", fields[:1])
