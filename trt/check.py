"""Static TensorRT compatibility check of exported ONNX graphs (no TensorRT needed).

TensorRT cannot be installed on this project's build machines, so the strongest proxy for "will
the ONNX parser of TensorRT X take this graph" is a walk over every node against the operator
table of that version (``trt/support/trt-<version>.json``, built from onnx-tensorrt's
``docs/operators.md``; see ``trt/support/README.md``) plus the restrictions the graphs are designed
around (TopK sorted/K, scatter reductions, float-only CumSum, data-dependent shapes), the plugin
attributes the parser needs to find our routing plugins, and the shape-tensor inputs.

Graphs are loaded without external data: the check needs structure, never weights.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from mllm_deploy.formats.manifest import GRAPHS
from mllm_deploy.core.errors import BundleError, MllmError

SUPPORT_DIR = Path(__file__).with_name("support")
PLUGIN_DOMAIN = "mllm_deploy"
PLUGIN_ATTRIBUTES = ("plugin_version", "plugin_namespace")
TOPK_K_LIMIT = 3840
# Output shape depends on values: TensorRT needs data-dependent-shape machinery (no CUDA graphs).
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
# ONNX element type name -> the spelling of onnx-tensorrt's "Supported Types" column (others keep their name).
_TYPE_SPELLING = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "FLOAT8E4M3FN": "FP8", "FLOAT8E5M2": "FP8",
                  "FLOAT4E2M1": "FP4"}


def _type_name(elem: int) -> str:
    name = TensorProto.DataType.Name(elem)
    return _TYPE_SPELLING.get(name, name)


# Ops whose "Supported Types" entry describes another tensor than input 0.
_TYPED_TENSOR = {"Where": ("in", 1), **{op: ("out", 0) for op in (
    "Constant", "ConstantOfShape", "OneHot", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
    "RandomUniformLike", "BlackmanWindow", "HammingWindow", "HannWindow")}}


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


SUPPORTED_TRT_VERSIONS: tuple[str, ...] = tuple(sorted(
    (p.stem.removeprefix("trt-") for p in SUPPORT_DIR.glob("trt-*.json")), key=_version_key))


class TensorRTVersionError(MllmError):
    """The requested TensorRT version has no operator table."""


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str
    op_type: str
    problem: str

    def line(self) -> str:
        return f"{self.graph}: {self.node} ({self.op_type}): {self.problem}"


@functools.lru_cache(maxsize=None)
def load_support(trt_version: str) -> dict[str, Any]:
    """The operator table of one TensorRT version (see trt/support/README.md)."""
    if trt_version not in SUPPORTED_TRT_VERSIONS:
        raise TensorRTVersionError(f"no operator table for TensorRT {trt_version!r}; "
                                   f"known versions: {', '.join(SUPPORTED_TRT_VERSIONS)}")
    return json.loads((SUPPORT_DIR / f"trt-{trt_version}.json").read_text())


@dataclass
class _Context:
    support: dict[str, Any]
    graph: str
    opset: int
    known_plugins: set[str] | None
    types: dict[str, int]
    consumed: set[str]
    findings: list[Finding] = field(default_factory=list)
    plugins: set[str] = field(default_factory=set)

    def add(self, node: str, op_type: str, problem: str) -> None:
        self.findings.append(Finding(self.graph, node, op_type, problem))


# ---- helpers over the graph -------------------------------------------------------------------------
def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    return [(a.name, g) for a in node.attribute for g in ([a.g] if a.type == AttributeProto.GRAPH else a.graphs)]


def _tensor_value(tensor: TensorProto) -> np.ndarray | None:
    """Value of an embedded tensor; None for external data (weights stay on disk)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return None
    return numpy_helper.to_array(tensor)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return _tensor_value(a.t)
        if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
            return np.asarray(helper.get_attribute_value(a))
    return None


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference where it works (else declared types)."""
    try:  # our plugin schemas let inference pass through routing nodes; optional
        from mllm_deploy.plugins.schemas import register_schemas
        register_schemas()
    except Exception:  # noqa: BLE001 - inference simply stops at unknown nodes without them
        pass
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - a graph inference rejects is still checked on declared types
        pass
    types: dict[str, int] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for init in graph.initializer:
            types[init.name] = init.data_type
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                types[value.name] = value.type.tensor_type.elem_type
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        types[node.output[0]] = a.t.data_type
            for _, sub in _subgraphs(node):
                collect(sub)

    collect(model.graph)
    return types


def _consumed(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    names.update(o.name for o in graph.output)
    for node in graph.node:
        names.update(i for i in node.input if i)
        for _, sub in _subgraphs(node):
            _consumed(sub, names)
    return names


# ---- restriction checks: a key in the JSON tables -> the problem, or None ------------------------------
def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _restriction(key: str, node: onnx.NodeProto, ctx: _Context, consts: dict) -> str | None:
    if key == "topk_sorted_must_be_1" and int(_attr(node, "sorted", 1)) == 0:
        return "sorted=0: TensorRT's TopK needs sorted=1 (order indices with a second TopK instead)"
    if key == "topk_k_max_3840":
        k = _attr(node, "k") if ctx.opset < 10 else consts.get(_input(node, 1))
        k = None if k is None else int(np.asarray(k).reshape(-1)[0])
        return f"K={k}: TensorRT's TopK needs K < {TOPK_K_LIMIT}" if k is not None and k >= TOPK_K_LIMIT else None
    if key == "scatter_no_reduction" and _attr(node, "reduction", "none") not in ("none", ""):
        how = "not supported" if node.op_type == "ScatterND" else "imported through an NVIDIA plugin"
        return f"reduction={_attr(node, 'reduction')!r} is {how}; export with reduction='none'"
    if key == "cumsum_float_only":
        elem = ctx.types.get(_input(node, 0))
        if elem is not None and elem not in _FLOAT_TYPES:
            return f"input is {_type_name(elem)}: TensorRT's CumSum takes float data only"
    if key == "constant_axes" and _input(node, 1) and _input(node, 1) not in consts:
        return f"axis/axes input {_input(node, 1)!r} is computed at run time; TensorRT needs it constant"
    if key == "squeeze_axes_required":
        has_axes = bool(_input(node, 1)) if ctx.opset >= 13 else _attr(node, "axes") is not None
        return None if has_axes else "no axes: this TensorRT version needs Squeeze axes given explicitly"
    if key == "data_dependent_shape":
        return "output shape depends on values (data-dependent shape): no static engine shapes, no CUDA graphs"
    if key == "first_output_only":
        extra = [o for o in node.output[1:] if o and o in ctx.consumed]
        return f"extra output(s) {extra} are used; TensorRT imports only the first output" if extra else None
    if key == "pool_2d_3d_only":
        kernel = _attr(node, "kernel_shape")
        return None if kernel is None or len(kernel) in (2, 3) else f"{len(kernel)}D pooling: TensorRT pools 2D/3D only"
    if key == "dq_weight_only_int4":
        return _dequantize_problem(node, ctx, consts)
    if key == "constant_dense_numeric_only":
        bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
        return f"{bad[0]} constants are not supported" if bad else None
    return None


# TensorRT's INT4 is weight-only with per-block scales, blocks of 64 or 128 along one of the last two dimensions
# (TensorRT documentation, "Quantization Schemes": "INT4 quantization requires per-block scales. The supported block
# sizes are {64, 128}"); its DequantizeLinear importer refuses a zero point that is not all zeros (onnx-tensorrt
# QuantDequantLinearHelper: "TensorRT only supports symmetric quantization").
TRT_INT4_BLOCK_SIZES = (64, 128)


def _dequantize_problem(node: onnx.NodeProto, ctx: _Context, consts: dict) -> str | None:
    zero_point = _input(node, 2)
    if zero_point:
        value = consts.get(zero_point)
        if value is not None and np.any(np.asarray(value) != 0):
            return "non-zero zero point: TensorRT dequantizes symmetrically only (zero point absent or all zeros)"
    if ctx.types.get(_input(node, 0)) == TensorProto.INT4:
        block = int(_attr(node, "block_size", 0) or 0)
        if block == 0:
            return "INT4 without block_size: TensorRT's INT4 needs per-block scales (blocks of 64 or 128)"
        if block not in TRT_INT4_BLOCK_SIZES:
            return (f"INT4 blocks of {block}: TensorRT supports blocks of 64 or 128; export with --block-size 64"
                    " or 128")
    return None


RESTRICTION_KEYS = ("dq_weight_only_int4", "topk_sorted_must_be_1", "topk_k_max_3840", "scatter_no_reduction", "cumsum_float_only",
                    "constant_axes", "squeeze_axes_required", "data_dependent_shape", "first_output_only",
                    "pool_2d_3d_only", "constant_dense_numeric_only")


def _type_problem(node: onnx.NodeProto, spec: dict, ctx: _Context) -> str | None:
    allowed = spec.get("types") or []
    if not allowed or "cumsum_float_only" in spec.get("restrictions", []):
        return None  # no types listed, or the dedicated check says it better
    side, index = _TYPED_TENSOR.get(node.op_type, ("in", 0))
    names = node.input if side == "in" else node.output
    elem = ctx.types.get(names[index]) if len(names) > index and names[index] else None
    name = _type_name(elem) if elem else None
    if name is None or name in allowed or (name == "DOUBLE" and "FP32" in allowed):  # DOUBLE is cast down
        return None
    return f"{name} data is not among TensorRT's types for {node.op_type} ({', '.join(allowed)})"


# ---- the walk ----------------------------------------------------------------------------------------
def _check_node(node: onnx.NodeProto, label: str, ctx: _Context, consts: dict) -> None:
    support, op = ctx.support, node.op_type
    version = support["tensorrt"]
    if node.domain in ("", "ai.onnx"):
        spec = support["ops"].get(op)
        if spec is None:
            why = "listed as unsupported" if op in support.get("unsupported", []) else "not listed"
            shape = "; its output shape is data-dependent" if op in DATA_DEPENDENT_OPS else ""
            ctx.add(label, op, f"not supported by TensorRT {version} ({why} in onnx-tensorrt operators.md){shape}")
            return
        for key in spec.get("restrictions", []):
            problem = _restriction(key, node, ctx, consts)
            if problem:
                ctx.add(label, op, problem)
        problem = _type_problem(node, spec, ctx)
        if problem:
            ctx.add(label, op, problem)
    elif node.domain == PLUGIN_DOMAIN:
        # TensorRT finds a plugin by (op_type, plugin_version, plugin_namespace); 10.3 needs both set.
        missing = [a for a in PLUGIN_ATTRIBUTES
                   if not any(x.name == a and x.type == AttributeProto.STRING for x in node.attribute)]
        if missing:
            ctx.add(label, op, f"missing plugin attributes: {', '.join(missing)} (string attributes TensorRT "
                               "uses to find the plugin)")
        elif ctx.known_plugins is not None and op not in ctx.known_plugins:
            ctx.add(label, op, f"no plugin {op!r} in the mllm_deploy plugin library "
                               f"(known: {', '.join(sorted(ctx.known_plugins))})")
        else:
            ctx.plugins.add(op)
    elif op not in support.get("custom_ops", {}).get("ops", []):
        ctx.add(label, op, f"domain {node.domain!r} has no TensorRT importer; it would need a registered plugin")


def _walk(graph: onnx.GraphProto, ctx: _Context, outer: dict, prefix: str) -> None:
    consts = dict(outer)  # name -> value (None: constant of unknown value, e.g. external data)
    consts.update((init.name, _tensor_value(init)) for init in graph.initializer)
    for index, node in enumerate(graph.node):
        label = prefix + (node.name or f"{node.op_type}#{index}")
        if node.domain in ("", "ai.onnx") and node.op_type == "Constant" and node.output:
            consts[node.output[0]] = _constant_node_value(node)
        elif node.op_type == "Identity" and _input(node, 0) in consts:
            consts[node.output[0]] = consts[_input(node, 0)]
        _check_node(node, label, ctx, consts)
        for attr_name, sub in _subgraphs(node):  # If/Loop/Scan bodies see the outer constants
            _walk(sub, ctx, consts, f"{label}/{attr_name}/")


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def analyse(model: onnx.ModelProto, trt_version: str, known_plugins: set[str] | None = None,
            graph_name: str | None = None) -> tuple[list[Finding], set[str]]:
    """Findings for one graph and the op types recognised as plugins."""
    support = load_support(trt_version)
    opset = _default_opset(model)
    ctx = _Context(support, graph_name or model.graph.name or "graph", opset or 0, known_plugins,
                   _element_types(model), _consumed(model.graph, set()))
    lo, hi = support["opset_min"], support["opset_max"]
    if opset is not None and not lo <= opset <= hi:
        hint = (" (INT4 weights need opset 21, block-wise DequantizeLinear: build them with TensorRT 10.16 or"
                f" later; for TensorRT {trt_version} export --quantize int8 --opset {hi}, or float weights)"
                if opset >= 21 > hi else "")
        ctx.add("(model)", "opset_import", f"default-domain opset {opset} is outside TensorRT {trt_version}'s "
                                           f"supported range {lo}-{hi}{hint}")
    _walk(model.graph, ctx, {}, "")
    return ctx.findings, ctx.plugins


def check_graph(model: onnx.ModelProto, trt_version: str, known_plugins: set[str] | None = None, *,
                graph_name: str | None = None) -> list[Finding]:
    """Every node (subgraphs included) that the ONNX parser of ``trt_version`` would refuse or mishandle."""
    return analyse(model, trt_version, known_plugins, graph_name)[0]


def _bundle_graphs(bundle_dir: Path) -> dict[str, Path]:
    manifest_path = bundle_dir / "manifest.json"
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory not found: {bundle_dir}")
    try:
        manifest = json.loads(manifest_path.read_text())
        # the portable graphs: the onnxruntime-target variants (ONNX Runtime's fused ops) are never built
        graphs = {name: bundle_dir / manifest["graphs"][name]["file"] for name in GRAPHS}
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir} has no manifest.json; is it a bundle written by export-mllm?") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{manifest_path} is not a readable bundle manifest ({exc!r}); re-export the bundle") from None
    for name, path in graphs.items():
        if not path.is_file():
            raise BundleError(f"bundle graph {name!r} ({path.name}) is missing from {bundle_dir}")
    return graphs


@dataclass
class BundleReport:
    findings: dict[str, list[Finding]]  # graph -> what the parser would refuse
    plugins: list[str]  # routing plugin op types recognised across the bundle
    shape_inputs: dict[str, list[str]]  # graph -> inputs TensorRT reads as shape tensors (informational)


def _shape_input_findings(graph: str, model: onnx.ModelProto) -> tuple[list[str], list[Finding]]:
    """The graph's shape-tensor inputs, and a finding for each that build-mllm could not give a value range."""
    from mllm_deploy.trt.profiles import SHAPE_INPUT_VALUES
    from mllm_deploy.trt.shape_inputs import shape_slot_path, shape_tensor_inputs

    names = shape_tensor_inputs(model)
    findings = []
    for name in names:
        if name not in SHAPE_INPUT_VALUES:
            node, op, slot = shape_slot_path(model.graph, name)
            findings.append(Finding(graph, name, "input", f"a shape tensor (its values reach {op} input {slot} at "
                                    f"{node}) with no value range build-mllm can derive for its profile"))
    return names, findings


def inspect_bundle(bundle_dir: str | Path, trt_version: str) -> BundleReport:
    """Per graph findings, the plugin op types recognised across the bundle, and the shape-tensor inputs."""
    from mllm_deploy.plugins.ops import OP_NAMES  # the op types our plugin library implements

    load_support(trt_version)  # an unknown version fails before any graph is read
    report = BundleReport({}, [], {})
    plugins: set[str] = set()
    graphs = _bundle_graphs(Path(bundle_dir))
    for name, path in graphs.items():
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - a corrupt graph file is the user's to fix
            raise BundleError(f"cannot read {path.name} as ONNX ({exc}); re-export the bundle") from None
        found, used = analyse(model, trt_version, set(OP_NAMES), graph_name=name)
        shape_inputs, unsized = _shape_input_findings(name, model)
        report.findings[name] = found + unsized
        report.shape_inputs[name] = shape_inputs
        plugins |= used
    report.plugins = sorted(plugins)
    return report


def check_bundle(bundle_dir: str | Path, trt_version: str) -> dict[str, list[Finding]]:
    """check_graph over every graph file the bundle manifest lists (weights are never loaded)."""
    return inspect_bundle(bundle_dir, trt_version).findings
