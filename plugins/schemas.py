"""ONNX schemas of the routing ops, so ``onnx.checker`` (full_check) and strict shape inference accept them.

``register_schemas()`` is idempotent and cheap after the first call; every module that builds or
checks plugin graphs calls it. ``make_node`` is the one way to spell a routing node: it always
sets the domain and the ``plugin_version`` / ``plugin_namespace`` strings TensorRT's parser needs.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import onnx
from onnx import TensorProto, TypeProto, helper
from onnx.defs import OpSchema

from mllm_deploy.plugins.ops import (
    ATTRIBUTES, DOMAIN, OP_NAMES, PLUGIN_NAMESPACE, PLUGIN_VERSION, STRING_CHOICES, VERSION,
)

__all__ = ["DOMAIN", "VERSION", "register_schemas", "make_node", "node_attributes"]

FLOAT_TYPES = ["tensor(float)", "tensor(float16)"]
_ATTR_TYPES = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING}
_lock = threading.Lock()
# The C++ registry holds the Python inference callables; keep them referenced here too so their
# lifetime never depends on how the binding stores them.
_inference_functions: list[Callable] = []


# ---- shape inference ------------------------------------------------------------------------
def _int_attr(ctx, name: str) -> int | None:
    attr = ctx.get_attribute(name)
    return None if attr is None else int(attr.i)


def _input_dims(ctx, index: int) -> list | None:
    """The input's dims (TensorShapeProto.Dimension) or None when its rank is unknown."""
    if not ctx.has_input(index):
        return None
    tensor_type = ctx.get_input_type(index).tensor_type
    return list(tensor_type.shape.dim) if tensor_type.HasField("shape") else None


def _tensor_type(elem_type: int, dims: Sequence[object]) -> TypeProto:
    """dims: ints (known), onnx Dimension protos (copied) or None (unknown)."""
    type_proto = TypeProto()
    type_proto.tensor_type.elem_type = elem_type
    shape = type_proto.tensor_type.shape
    for dim in dims:
        new = shape.dim.add()
        if isinstance(dim, int):
            new.dim_value = dim
        elif dim is not None and (dim.HasField("dim_value") or dim.HasField("dim_param")):
            new.CopyFrom(dim)
    return type_proto


def _dim(dims: list | None, axis: int):
    return dims[axis] if dims is not None and len(dims) > axis else None


def _known(dim) -> int | None:
    return int(dim.dim_value) if dim is not None and dim.HasField("dim_value") else None


def _infer_visual_score(ctx) -> None:
    ctx.set_output_type(0, _tensor_type(TensorProto.FLOAT, [_int_attr(ctx, "n_vis")]))


def _infer_token_select(ctx) -> None:
    data_dims, pos_dims = _input_dims(ctx, 2), _input_dims(ctx, 3)
    k, n_vis = _int_attr(ctx, "k"), _int_attr(ctx, "n_vis")
    seq_len = _known(_dim(data_dims, 1))
    if seq_len is None:
        seq_len = _known(_dim(pos_dims, 1))
    kept = seq_len - n_vis + k if seq_len is not None and k is not None and n_vis is not None else None
    data_elem = ctx.get_input_type(2).tensor_type.elem_type
    ctx.set_output_type(0, _tensor_type(data_elem, [_dim(data_dims, 0), kept, _dim(data_dims, 2)]))
    ctx.set_output_type(1, _tensor_type(TensorProto.INT64, [_dim(pos_dims, 0), kept]))
    ctx.set_output_type(2, _tensor_type(TensorProto.INT64, [kept]))


def _infer_token_scatter(ctx) -> None:
    ctx.set_output_type(0, ctx.get_input_type(0))  # out has base's dtype and shape


# ---- schemas --------------------------------------------------------------------------------
def _param(name: str, type_str: str, doc: str, optional: bool = False) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, type_str, doc, param_option=option)


def _attributes(op_type: str) -> list[OpSchema.Attribute]:
    attrs = [OpSchema.Attribute(name, _ATTR_TYPES[kind], "see plugins/ops.py", required=True)
             for name, kind in ATTRIBUTES[op_type].items()]
    # Optional (not defaulted) so nodes without them still validate; make_node always writes them.
    attrs += [OpSchema.Attribute(name, OpSchema.AttrType.STRING, doc, required=False) for name, doc in (
        ("plugin_version", "TensorRT plugin version, \"1\""), ("plugin_namespace", "TensorRT plugin namespace"))]
    return attrs


def _schemas() -> list[tuple[OpSchema, Callable]]:
    index = "tensor(int64)"
    visual = OpSchema(
        "VisualScore", DOMAIN, VERSION,
        "Importance of each visual token from the attention of query rows over all keys (calib/scoring.py).",
        inputs=[_param("q", "T", "[1, H, Tq, Dh] post-RoPE queries of the last Tq <= T tokens"), _param("k", "T", "[1, Hkv, T, Dh] post-RoPE keys"),
                _param("positions", "I", "[1, T] original position ids"), _param("vis_start", "I", "[1] first visual row")],
        outputs=[_param("scores", "F", "[n_vis] float32")],
        type_constraints=[("T", FLOAT_TYPES, "activations"), ("I", [index], "indices"),
                          ("F", ["tensor(float)"], "scores")],
        attributes=_attributes("VisualScore"))
    select = OpSchema(
        "TokenSelect", DOMAIN, VERSION,
        "Keep the k best-scored visual rows in original order; text rows always kept.",
        inputs=[_param("scores", "F", "[n_vis] float32"), _param("vis_start", "I", "[1] first visual row"),
                _param("data", "T", "[1, T, D]"), _param("positions", "I", "[1, T]")],
        outputs=[_param("data_out", "T", "[1, T - n_vis + k, D]"), _param("positions_out", "I", "[1, T - n_vis + k]"),
                 _param("rows_out", "I", "[T - n_vis + k] kept row indices")],
        type_constraints=[("T", FLOAT_TYPES, "activations"), ("I", [index], "indices"),
                          ("F", ["tensor(float)"], "scores")],
        attributes=_attributes("TokenSelect"))
    scatter = OpSchema(
        "TokenScatter", DOMAIN, VERSION,
        "Write processed rows back into base; the other rows pass through (times skip_scale when given).",
        inputs=[_param("base", "T", "[1, T, D]"), _param("updates", "T", "[1, K, D]"),
                _param("rows", "I", "[K] distinct row indices"),
                _param("skip_scale", "T", "[1, T, 1] scale of skipped rows", optional=True)],
        outputs=[_param("out", "T", "[1, T, D]")],
        type_constraints=[("T", FLOAT_TYPES, "activations"), ("I", [index], "indices")],
        attributes=_attributes("TokenScatter"))
    return [(visual, _infer_visual_score), (select, _infer_token_select), (scatter, _infer_token_scatter)]


def register_schemas() -> None:
    """Register the three schemas with onnx once per process (safe to call from anywhere, any number of times)."""
    with _lock:
        for schema, infer in _schemas():
            if onnx.defs.has(schema.name, VERSION, DOMAIN):
                continue  # registered by an earlier call (maybe from another copy of this module)
            schema.set_type_and_shape_inference_function(infer)
            _inference_functions.append(infer)
            onnx.defs.register_schema(schema)


# ---- nodes ----------------------------------------------------------------------------------
def make_node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None,
              **attrs) -> onnx.NodeProto:
    """A routing node with its domain and TensorRT plugin attributes; attributes are type-checked."""
    if op_type not in OP_NAMES:
        raise ValueError(f"unknown routing op {op_type!r}; expected one of {OP_NAMES}")
    spec = ATTRIBUTES[op_type]
    missing, unknown = set(spec) - set(attrs), set(attrs) - set(spec)
    if missing or unknown:
        raise ValueError(f"{op_type}: missing attributes {sorted(missing)}, unknown {sorted(unknown)}")
    values = {}
    for key, kind in spec.items():
        value = kind(attrs[key])  # e.g. scale=1 must still become a FLOAT attribute
        if key in STRING_CHOICES and value not in STRING_CHOICES[key]:
            raise ValueError(f"{op_type}.{key} must be one of {STRING_CHOICES[key]}, got {value!r}")
        values[key] = value
    return helper.make_node(op_type, list(inputs), list(outputs), name=name or None, domain=DOMAIN,
                            plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE, **values)


def node_attributes(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes as Python values (strings decoded), ready for ``REFERENCES[op](*x, **attrs)``."""
    values = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        values[attr.name] = value.decode() if isinstance(value, bytes) else value
    return values
