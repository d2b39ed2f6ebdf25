"""bundle/manifest.json (schema ``mllm-deploy/bundle@1``): written here, read by runtime/bundle.py."""

from __future__ import annotations

from pathlib import Path

import onnx

from mllm_deploy.core.hashing import sha256_file

from mllm_deploy.formats.manifest import BUNDLE_SCHEMA  # noqa: F401 - the exporter writes it

_DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT8: "int8",  # quantized weights (export/quantize.py)
    onnx.TensorProto.INT4: "int4",
}


def _value_infos(values) -> list[dict]:
    out = []
    for value in values:
        tensor = value.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        out.append({"name": value.name, "dtype": _DTYPE_NAMES[tensor.elem_type], "shape": dims})
    return out


def external_initializers(model: onnx.ModelProto) -> list[dict]:
    """name, file, offset, length, dtype and shape of every initializer stored outside the graph file."""
    entries = []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        entries.append({"name": tensor.name, "file": info["location"], "offset": int(info.get("offset", 0)),
                        "length": int(info["length"]), "dtype": _DTYPE_NAMES[tensor.data_type],
                        "shape": [int(d) for d in tensor.dims]})
    return entries


def graph_entry(model: onnx.ModelProto, file_name: str) -> dict:
    from mllm_deploy.trt.shape_inputs import shape_tensor_inputs

    from mllm_deploy.plugins.schemas import DOMAIN

    # mllm_deploy's routing ops (plugins); ONNX Runtime's own com.microsoft ops need no plugin
    custom = sorted({node.op_type for node in model.graph.node if node.domain == DOMAIN})
    return {
        "file": file_name,
        "custom_ops": custom,
        "inputs": _value_infos(model.graph.input),
        "outputs": _value_infos(model.graph.output),
        # inputs TensorRT reads as shape tensors: profile values at build time, host memory at run time
        "shape_inputs": shape_tensor_inputs(model),
        # where each weight lies in the shared weights file: the runtime maps the file once and hands the same
        # arrays to every session, so the LLM weights are resident once although two graphs use them
        "external_initializers": external_initializers(model),
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
    }


def file_hashes(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every file in the bundle except the manifest itself, by relative path."""
    hashes = {}
    for path in sorted(bundle_dir.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            hashes[path.relative_to(bundle_dir).as_posix()] = sha256_file(path)
    return hashes
