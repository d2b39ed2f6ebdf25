"""ONNX Runtime CPU kernels of the routing ops: onnxruntime-extensions PyOps that call the NumPy references.

A PyOp lives in the fixed domain ``ai.onnx.contrib`` and has fixed input dtypes and arity, so
``to_ort_model`` rewrites each ``mllm_deploy`` node to the PyOp for its op and arity
(``mllm_deploy_VisualScore_f32``, ``mllm_deploy_TokenSelect_f32``, ``mllm_deploy_TokenScatter_f32_3`` / ``_4``),
with Casts around it when its data is float16. What onnxruntime-extensions 0.15 imposes:

- float16 tensors abort the process inside a PyOp ("Type float16 not supported by python customops
  api", a C++ ``std::terminate``, not a Python error). Only float32 PyOps exist; a float16 node
  gets Cast nodes around it. That is exact: the ops only copy rows (TokenSelect, TokenScatter) or
  compute in float32 anyway (VisualScore); the one product, ``base * skip_scale``, is exact in
  float32 and rounds once to float16, as float16 arithmetic does.
- float attributes reach Python printed with 6 significant digits (``0.10206207`` -> ``0.102062``),
  so ``scale`` travels as a string attribute holding the float32 value's repr.
- attributes the PyOp does not declare (``plugin_version``, ``plugin_namespace``) are ignored by
  ONNX Runtime and the kernel, so they stay on the node; a declared one that is missing fails the
  session.
- a Python exception raised in a PyOp also ends in ``std::terminate``: the kernels catch it and
  ``PluginSession.run`` raises it after the run.
- outputs are handed back as ``ndarray.flatten().tolist()`` (hundreds of ms for a [1, 600, 4096]
  tensor); an ndarray subclass whose ``tolist`` returns the array itself keeps the copy in C.
  (The C side checks only the item size against the declared dtype, not the byte count.)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from mllm_deploy.plugins.ops import ATTRIBUTES, DOMAIN, OP_NAMES, REFERENCES
from mllm_deploy.plugins.schemas import register_schemas


def _import_extensions():
    """Import onnxruntime_extensions without the baggage of its ``__init__``.

    Its tokenizer converters (``cvt.py``, imported unconditionally when onnx and onnxruntime are
    present) import transformers and torch (~1.5 s; the runtime must not import torch) and set
    PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python for every child process. Both imports sit in
    ``try/except ImportError``, so they are blocked for the import when not already loaded, and
    the environment variable is put back.
    """
    if "onnxruntime_extensions" in sys.modules:
        return sys.modules["onnxruntime_extensions"]
    blocked = [name for name in ("torch", "transformers") if name not in sys.modules]
    env_key = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"
    env_before = os.environ.get(env_key)
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        import onnxruntime_extensions
    finally:
        for name in blocked:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
        if env_before is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = env_before
    return onnxruntime_extensions


ortx = _import_extensions()
PyCustomOpDef = ortx.PyCustomOpDef

PYOP_DOMAIN = ortx.default_opset_domain()  # "ai.onnx.contrib"
PYOP_PREFIX = "mllm_deploy_"
_F32, _I64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64
_ATTR_DTYPES = {int: PyCustomOpDef.dt_int64, float: PyCustomOpDef.dt_string, str: PyCustomOpDef.dt_string}
_FLOAT_ELEMS = (TensorProto.FLOAT, TensorProto.FLOAT16)


class _NoListArray(np.ndarray):
    """Returned to onnxruntime-extensions: its hook calls ``r.flatten().tolist()`` on every output and
    C++ then runs ``np.ascontiguousarray`` on the result; handing the array back skips a Python list."""

    def tolist(self):  # type: ignore[override]
        return self.view(np.ndarray)


def _fast_outputs(outputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(o).view(_NoListArray) for o in outputs)


# (op_type, arity) -> (input dtypes, output dtypes); float16 goes through Cast (module docstring)
_SIGNATURES: dict[tuple[str, int], tuple[list[int], list[int]]] = {
    ("VisualScore", 4): ([_F32, _F32, _I64, _I64], [_F32]),
    ("TokenSelect", 4): ([_F32, _I64, _F32, _I64], [_F32, _I64, _I64]),
    ("TokenScatter", 3): ([_F32, _F32, _I64], [_F32]),
    ("TokenScatter", 4): ([_F32, _F32, _I64, _F32], [_F32]),
}
_FIXED_ARITY = {"VisualScore", "TokenSelect"}  # named without an arity suffix
# Inputs and outputs typed like the activations ("T" in the schemas): the ones cast for float16.
_T_INPUTS = {"VisualScore": (0, 1), "TokenSelect": (2,), "TokenScatter": (0, 1, 3)}
_T_OUTPUTS = {"VisualScore": (), "TokenSelect": (0,), "TokenScatter": (0,)}


def pyop_name(op_type: str, arity: int) -> str:
    suffix = "" if op_type in _FIXED_ARITY else f"_{arity}"
    return f"{PYOP_PREFIX}{op_type}_f32{suffix}"


# A Python exception escaping a PyOp kills the process (std::terminate in the extension), so the
# kernels catch it, return empty outputs, and PluginSession.run raises it once the run is over.
# Nodes run on the calling thread with the default sequential executor, hence thread-local.
_errors = threading.local()
_log = logging.getLogger(__name__)


def _kernel(op_type: str, n_outputs: int) -> Callable[..., tuple[np.ndarray, ...]]:
    reference, spec = REFERENCES[op_type], ATTRIBUTES[op_type]

    def compute(*inputs: np.ndarray, **attrs) -> tuple[np.ndarray, ...]:
        try:
            # Attributes arrive as str/int per their declared PyOp dtype; floats were sent as strings.
            values = {key: float(attrs[key]) if kind is float else attrs[key] for key, kind in spec.items()}
            return _fast_outputs(reference(*inputs, **values))
        except Exception as exc:  # noqa: BLE001 - anything raised here must not reach C++
            # logged too: a session not made by create_session would otherwise only see empty outputs
            _log.error("%s kernel failed: %s", op_type, exc)
            if getattr(_errors, "pending", None) is None:
                _errors.pending = exc
            return tuple(np.zeros(0, np.float32) for _ in range(n_outputs))

    return compute


class PluginSession(ort.InferenceSession):
    """An InferenceSession whose ``run`` raises errors of the routing kernels instead of aborting."""

    def run(self, output_names, input_feed, run_options=None):
        _errors.pending = None
        try:
            outputs = super().run(output_names, input_feed, run_options)
        except Exception as exc:
            error, _errors.pending = getattr(_errors, "pending", None), None
            if error is not None:  # the empty outputs of a failed kernel broke a later node
                raise error from exc
            raise
        error, _errors.pending = _errors.pending, None
        if error is not None:
            raise error
        return outputs


def _register_pyops() -> None:
    """Declare the PyOps once per process (a second declaration of a name would make sessions fail)."""
    taken = {opdef.op_type for opdef in ortx.Opdef._odlist.values()}
    for (op_type, arity), (inputs, outputs) in _SIGNATURES.items():
        name = pyop_name(op_type, arity)
        if name in taken:
            continue
        attrs = {key: _ATTR_DTYPES[kind] for key, kind in ATTRIBUTES[op_type].items()}
        ortx.onnx_op(op_type=name, inputs=inputs, outputs=outputs, attrs=attrs)(_kernel(op_type, len(outputs)))


_register_pyops()


# ---- model rewrite ----------------------------------------------------------------------------
def has_plugin_nodes(model: onnx.ModelProto) -> bool:
    return any(node.domain == DOMAIN for node in model.graph.node)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value of the main graph (declared, or found by shape inference)."""
    register_schemas()  # so inference sees through our nodes to the values after them
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # inference is only a help here; declared types may be enough
        graph = model.graph
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def _float_elem(node: onnx.NodeProto, inputs: Sequence[str], types: dict[str, int]) -> int:
    data_index = 2 if node.op_type == "TokenSelect" else 0  # TokenSelect's scores are always float32
    elem = types.get(inputs[data_index])
    if elem not in _FLOAT_ELEMS:
        raise ValueError(f"{node.op_type} node {node.name!r}: cannot tell the float dtype of input "
                         f"{inputs[data_index]!r} (got {elem}); declare it in value_info")
    return elem


def _rewrite_node(node: onnx.NodeProto, types: dict[str, int], index: int) -> list[onnx.NodeProto]:
    inputs = list(node.input)
    while inputs and not inputs[-1]:  # trailing empty names are absent optional inputs
        inputs.pop()
    key = (node.op_type, len(inputs))
    if node.op_type not in OP_NAMES or key not in _SIGNATURES:
        raise ValueError(f"no ONNX Runtime kernel for {node.op_type} with {len(inputs)} inputs (node {node.name!r})")
    half = _float_elem(node, inputs, types) == TensorProto.FLOAT16
    tag = f"{node.name or node.op_type}/mllm_ort{index}"
    before, after, new_inputs, new_outputs = [], [], list(inputs), list(node.output)
    for i in _T_INPUTS[node.op_type] if half else ():
        if i < len(inputs):
            new_inputs[i] = f"{tag}/in{i}_f32"
            before.append(helper.make_node("Cast", [inputs[i]], [new_inputs[i]], name=f"{tag}/CastIn{i}",
                                           to=TensorProto.FLOAT))
    for i in _T_OUTPUTS[node.op_type] if half else ():
        new_outputs[i] = f"{tag}/out{i}_f32"
        after.append(helper.make_node("Cast", [new_outputs[i]], [node.output[i]], name=f"{tag}/CastOut{i}",
                                      to=TensorProto.FLOAT16))
    attrs = []
    for attr in node.attribute:
        if ATTRIBUTES[node.op_type].get(attr.name) is float:
            # repr of the float32 value round-trips exactly; the PyOp's float path keeps 6 digits
            value = float(np.float32(helper.get_attribute_value(attr)))
            attrs.append(helper.make_attribute(attr.name, repr(value)))
        else:
            attrs.append(attr)
    pyop = helper.make_node(pyop_name(*key), new_inputs, new_outputs, name=node.name or None, domain=PYOP_DOMAIN)
    pyop.attribute.extend(attrs)
    return [*before, pyop, *after]


def to_ort_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``mllm_deploy`` nodes are onnxruntime-extensions PyOps (main graph only)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not has_plugin_nodes(out):
        return out
    types = _elem_types(model)
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(out.graph.node):
        nodes.extend(_rewrite_node(node, types, index) if node.domain == DOMAIN else [node])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    imports = {o.domain: o.version for o in out.opset_import if o.domain != DOMAIN}
    imports.setdefault("", 17)  # Cast needs the standard domain
    imports.setdefault(PYOP_DOMAIN, 1)
    del out.opset_import[:]
    out.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in imports.items())
    return out


_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_options_with_library: "weakref.WeakSet[ort.SessionOptions]" = weakref.WeakSet()


def create_session(path: str | Path, session_options: ort.SessionOptions | None = None,
                   providers: Sequence[str] | None = None) -> PluginSession:
    """An InferenceSession for a graph that may hold routing nodes; its external data resolves beside it.

    ``session_options`` may be reused across calls (e.g. prefill and decode of one bundle).
    """
    model = to_ort_model(onnx.load(str(path), load_external_data=False))
    options = session_options or ort.SessionOptions()
    # The session is built from bytes, so tell ORT where weights.bin and friends are (set only when
    # it changes: ORT warns on every overwrite).
    folder = str(Path(path).resolve().parent)
    try:
        current = options.get_session_config_entry(_EXTERNAL_FOLDER_KEY)
    except RuntimeError:  # not set yet
        current = None
    if current != folder:
        options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, folder)
    # Registering the library twice on one SessionOptions fails session creation (duplicate kernels).
    if options not in _options_with_library:
        options.register_custom_ops_library(ortx.get_library_path())
        _options_with_library.add(options)
    return PluginSession(model.SerializeToString(), options,
                         providers=list(providers) if providers else ["CPUExecutionProvider"])
