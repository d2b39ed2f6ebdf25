"""TensorRT plugin fields of the routing ops: what the creators declare and how node attributes become fields.

TensorRT's ONNX parser asks a plugin creator for its field names and types (``getFieldNames``)
and converts each node attribute of that name to the declared type; ``plugin_version`` and
``plugin_namespace`` only select the creator. The C++ creators (``plugins/trt/routing_plugins.cpp``)
declare ``FIELD_TYPES`` below; a test reads the C++ source to keep the two in step. The plugin
serialises the same fields into the engine (``getFieldsToSerialize``) and reads them back at
deserialisation, which :func:`encode_fields` / :func:`decode_fields` mirror byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Mapping

from mllm_deploy.plugins.ops import ATTRIBUTES, OP_NAMES, PLUGIN_NAMESPACE, PLUGIN_VERSION, STRING_CHOICES

LOOKUP_ATTRIBUTES = ("plugin_version", "plugin_namespace")


class PluginFieldType(IntEnum):
    """nvinfer1::PluginFieldType (NvInferPluginBase.h / NvInferRuntimeCommon.h), values as in TensorRT 10."""
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10


_PYTHON_TO_FIELD = {int: PluginFieldType.INT32, float: PluginFieldType.FLOAT32, str: PluginFieldType.CHAR}
# op -> ordered (field name, type): what each creator's getFieldNames() returns
FIELD_TYPES: dict[str, tuple[tuple[str, PluginFieldType], ...]] = {
    op: tuple((name, _PYTHON_TO_FIELD[kind]) for name, kind in ATTRIBUTES[op].items()) for op in OP_NAMES
}


@dataclass(frozen=True)
class PluginFieldValue:
    name: str
    type: PluginFieldType
    data: bytes  # what PluginField::data points to
    length: int  # PluginField::length: elements (bytes for CHAR, no terminating NUL)


def plugin_key(op_type: str, attributes: Mapping[str, object]) -> tuple[str, str, str]:
    """(name, version, namespace) the ONNX parser looks the creator up by (defaults "1" and "")."""
    return (op_type, str(attributes.get("plugin_version", "1")), str(attributes.get("plugin_namespace", "")))


def encode_fields(op_type: str, attributes: Mapping[str, object]) -> list[PluginFieldValue]:
    """Node attributes -> the fields the creator receives (and the plugin serialises), in declaration order."""
    if op_type not in FIELD_TYPES:
        raise ValueError(f"{op_type!r} is not a routing op; expected one of {OP_NAMES}")
    key = plugin_key(op_type, attributes)
    if key != (op_type, PLUGIN_VERSION, PLUGIN_NAMESPACE):
        raise ValueError(f"{op_type}: plugin_version/plugin_namespace {key[1:]!r} do not name the mllm_deploy plugin "
                         f"({PLUGIN_VERSION!r}, {PLUGIN_NAMESPACE!r})")
    fields = []
    for name, kind in FIELD_TYPES[op_type]:
        if name not in attributes:
            raise ValueError(f"{op_type}: attribute {name!r} is missing; the creator needs it")
        value = attributes[name]
        if kind is PluginFieldType.INT32:
            number = int(value)  # type: ignore[arg-type]
            if not -2**31 <= number < 2**31:
                raise ValueError(f"{op_type}.{name}={number} does not fit INT32")
            fields.append(PluginFieldValue(name, kind, struct.pack("<i", number), 1))
        elif kind is PluginFieldType.FLOAT32:
            fields.append(PluginFieldValue(name, kind, struct.pack("<f", float(value)), 1))  # type: ignore[arg-type]
        else:
            text = str(value)
            if name in STRING_CHOICES and text not in STRING_CHOICES[name]:
                raise ValueError(f"{op_type}.{name} must be one of {STRING_CHOICES[name]}, got {text!r}")
            data = text.encode("ascii")
            fields.append(PluginFieldValue(name, kind, data, len(data)))
    return fields


def decode_fields(op_type: str, fields: list[PluginFieldValue]) -> dict[str, object]:
    """The creator's view of a field list: attribute values back (CHAR read up to length or NUL)."""
    by_name = {field.name: field for field in fields}
    values: dict[str, object] = {}
    for name, kind in FIELD_TYPES[op_type]:
        field = by_name.get(name)
        if field is None:
            raise ValueError(f"{op_type}: field {name!r} is missing")
        if field.type is not kind:
            raise ValueError(f"{op_type}: field {name!r} is {field.type.name}, the creator reads {kind.name}")
        if kind is PluginFieldType.INT32:
            values[name] = struct.unpack("<i", field.data[:4])[0]
        elif kind is PluginFieldType.FLOAT32:
            values[name] = struct.unpack("<f", field.data[:4])[0]
        else:
            values[name] = field.data[:field.length].split(b"\0", 1)[0].decode("ascii")
    return values
