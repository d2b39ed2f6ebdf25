"""A small ONNX graph builder: hierarchical node names, typed inputs/outputs, shared weights.

Graphs are written op by op (rather than traced) so that every node has a stable,
hierarchical name (``/model/layers.3/attn/MatMul``) a profile or a TensorRT layer
precision override can refer to, and so that nothing the recipe does is left to an
exporter's choices.

Weights are not embedded: every graph of a bundle references one shared ``weights.bin``
through ONNX external data, so prefill and decode do not each carry a copy of the LLM.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ONNX_DTYPE = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,
    np.dtype("bool"): TensorProto.BOOL,
    np.dtype("int8"): TensorProto.INT8,
}
ALIGNMENT = 64  # bytes; keeps every tensor in weights.bin aligned for mmap-based loaders
SMALL_CONSTANT_BYTES = 1024  # below this a constant is embedded in the graph


class WeightStore:
    """Appends arrays to one binary file and hands out ONNX external-data references.

    The same array name is written once, whichever graphs use it.
    """

    def __init__(self, path: str | Path, on_new: Callable[[str, int], None] | None = None):
        self.path = Path(path)
        self.on_new = on_new  # called with (name, bytes) when a weight is written (export's progress bar)
        self._handle = open(self.path, "wb")
        self._offset = 0
        self._entries: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}  # offset, bytes, ONNX type, shape

    def tensor(self, name: str, array: np.ndarray, data_type: int | None = None,
               shape: tuple[int, ...] | None = None) -> TensorProto:
        """``array`` written once under ``name``; ``data_type``/``shape`` describe bytes whose ONNX type has no
        NumPy dtype (INT4: two values per byte, ``array`` holds the packed bytes)."""
        array = np.ascontiguousarray(array)
        data_type = ONNX_DTYPE[array.dtype] if data_type is None else data_type
        shape = tuple(array.shape) if shape is None else tuple(shape)
        if name not in self._entries:
            pad = (-self._offset) % ALIGNMENT
            if pad:
                self._handle.write(b"\0" * pad)
                self._offset += pad
            self._handle.write(array.reshape(-1).view(np.uint8).data)  # no bytes copy of a large tensor
            self._entries[name] = (self._offset, array.nbytes, data_type, shape)
            self._offset += array.nbytes
            if self.on_new is not None:
                self.on_new(name, array.nbytes)
        offset, length, stored_type, stored_shape = self._entries[name]
        if stored_type != data_type or stored_shape != shape:
            raise ValueError(f"weight {name} stored twice with different dtype/shape")
        return self._reference(name, offset, length, data_type, shape)

    def _reference(self, name: str, offset: int, length: int, data_type: int, shape: tuple[int, ...]) -> TensorProto:
        proto = TensorProto()
        proto.name = name
        proto.data_type = data_type
        proto.dims.extend(shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def stored(self, name: str) -> TensorProto | None:
        """The external-data reference of a weight already written, or None."""
        if name not in self._entries:
            return None
        return self._reference(name, *self._entries[name])

    def close(self) -> None:
        self._handle.close()


def _is_lazy(value) -> bool:
    """A checkpoint weight read on demand (export/checkpoint.LazyWeight)."""
    return hasattr(value, "load") and hasattr(value, "name")


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self, name: str, opset: int, weights: WeightStore | None = None, target: str = "portable",
                 quant=None):
        self.name = name
        self.quant = quant  # export/quantize.QuantScheme of the linear layers, or None (float weights)
        self.opset = opset
        self.target = target  # "portable" (standard ops: TensorRT, any runtime) or "onnxruntime" (its fused ops)
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._scope: list[str] = []
        self._used_names: dict[str, int] = {}
        self._initializer_names: set[str] = set()
        self._quantized_shapes: dict[str, tuple[int, int]] = {}  # integers' name -> [K, N]
        self.custom_domains: dict[str, int] = {}
        self.value_infos: list[onnx.ValueInfoProto] = []  # element types ONNX's inference cannot derive

    # ---- naming -------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _unique(self, base: str) -> str:
        count = self._used_names.get(base, 0)
        self._used_names[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def node_name(self, op_type: str, name: str | None = None) -> str:
        return self._unique("/" + "/".join([*self._scope, name or op_type]))

    # ---- graph pieces ----------------------------------------------------------------------
    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        name: str | None = None,
        outputs: int | Sequence[str] = 1,
        domain: str = "",
        **attrs,
    ) -> str | list[str]:
        node_name = self.node_name(op_type, name)
        if isinstance(outputs, int):
            out_names = [f"{node_name}/output_{i}" for i in range(outputs)]
        else:
            out_names = list(outputs)
        node = helper.make_node(op_type, list(inputs), out_names, name=node_name, domain=domain or None, **attrs)
        self.nodes.append(node)
        return out_names[0] if len(out_names) == 1 else out_names

    def const(self, value, name: str | None = None, dtype=None) -> str:
        """A constant tensor: small ones embedded, large ones in weights.bin. A lazy checkpoint weight
        (export/checkpoint.py) is read only when the weights file does not hold it yet."""
        tensor_name = name or self.node_name("Constant").lstrip("/").replace("/", ".")
        if tensor_name in self._initializer_names:
            return tensor_name
        if _is_lazy(value):
            stored = self.weights.stored(tensor_name) if self.weights is not None else None
            if stored is not None:  # another graph wrote it already: reference it without reading it again
                self.initializers.append(stored)
                self._initializer_names.add(tensor_name)
                return tensor_name
            value = value.load()
        array = np.asarray(value, dtype=dtype)
        if self.weights is not None and array.nbytes > SMALL_CONSTANT_BYTES:
            proto = self.weights.tensor(tensor_name, array)
        else:
            proto = numpy_helper.from_array(array, tensor_name)
        self.initializers.append(proto)
        self._initializer_names.add(tensor_name)
        return tensor_name

    def quantized(self, value, name: str) -> tuple[str, str, tuple[int, int]]:
        """(integers, scales, [K, N]) of a linear weight quantized with ``self.quant``, written once to weights.bin
        under ``{name}.q4``/``.q8`` and ``{name}.scale`` whichever graph asks first (a lazy checkpoint weight is read and
        quantized only then)."""
        from mllm_deploy.export import quantize as q

        scheme = self.quant
        q_name, s_name = f"{name}.q{scheme.bits}", f"{name}.scale"
        if q_name not in self._initializer_names:
            stored = self.weights.stored(q_name) if self.weights is not None else None
            if stored is not None:
                self.initializers += [stored, self.weights.stored(s_name)]
                self._quantized_shapes[q_name] = tuple(stored.dims)
            else:
                array = value.load() if _is_lazy(value) else np.asarray(value)
                q.check_shape(name, array.shape[0], scheme)
                self._quantized_shapes[q_name] = tuple(array.shape)
                data, scale = q.quantize(array, scheme)
                kind = TensorProto.INT4 if scheme.bits == 4 else TensorProto.INT8
                if self.weights is not None:
                    self.initializers.append(self.weights.tensor(q_name, data, kind, array.shape))
                    self.initializers.append(self.weights.tensor(s_name, scale))
                else:
                    self.initializers.append(helper.make_tensor(q_name, kind, array.shape, data.tobytes(), raw=True))
                    self.initializers.append(numpy_helper.from_array(scale, s_name))
            self._initializer_names.update((q_name, s_name))
        return q_name, s_name, self._quantized_shapes[q_name]

    def ints(self, values: Sequence[int]) -> str:
        """An int64 1-D constant, named by its value so repeats are shared."""
        values = [int(v) for v in values]
        key = "const.i64." + "_".join(str(v).replace("-", "m") for v in values)
        return self.const(np.array(values, dtype=np.int64), name=key)

    def scalar(self, value: float, dtype: np.dtype) -> str:
        array = np.array(value, dtype=dtype)
        key = f"const.{np.dtype(dtype).name}.{float(value)!r}".replace("-", "m")
        return self.const(array, name=key)

    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, tensor: str, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        self.op("Identity", [tensor], name=f"output/{name}", outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def typed(self, tensors: str | Sequence[str], elem_type: int) -> str | list[str]:
        """Declare the element type of outputs of ops ONNX's own type inference does not know (ONNX Runtime's
        contrib ops), so tools that infer types downstream (the routing plugins' ORT kernels) still can."""
        for name in [tensors] if isinstance(tensors, str) else tensors:
            self.value_infos.append(helper.make_tensor_value_info(name, elem_type, None))
        return tensors

    # ---- common op helpers (opset-dependent spellings live here) ---------------------------
    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        """ReduceSum takes axes as an input since opset 13, the other reductions since 18."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.ints(axes)], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def reduce_mean(self, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        return self.reduce("ReduceMean", x, axes, keepdims)

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        return self.op("Reshape", [x, self.ints(shape)])

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self.op("Transpose", [x], perm=list(perm))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [x, self.ints(axes)])

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", [x, self.ints(axes)])

    def slice(self, x: str, starts: str, ends: str, axes: Sequence[int]) -> str:
        return self.op("Slice", [x, starts, ends, self.ints(axes)])

    def split(self, x: str, sizes: Sequence[int], axis: int) -> list[str]:
        """Split into pieces of the given sizes (opset 18 made the count an attribute)."""
        return self.op("Split", [x, self.ints(sizes)], outputs=len(sizes), axis=axis)

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], to=to)

    def make_model(self, producer: str = "mllm-deploy") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers,
                                  value_info=self.value_infos)
        opsets = [helper.make_opsetid("", self.opset)]
        domains = dict(self.custom_domains)
        if any(node.domain == "com.microsoft" for node in self.nodes):
            domains["com.microsoft"] = 1
        opsets += [helper.make_opsetid(domain, version) for domain, version in sorted(domains.items())]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        # IR 9 is readable by onnxruntime >= 1.16 and TensorRT 10; opset 21 (INT4 weights) needs IR 10
        model.ir_version = 10 if self.opset >= 21 else min(model.ir_version, 9)
        return model
