"""Which graph inputs TensorRT will read as *shape tensors* (pure analysis of an ONNX graph).

TensorRT computes shapes on the host before it runs a network. A network input whose *values*
reach a slot that defines a shape (Slice starts/ends/axes/steps, Range, Reshape/Expand/Tile
shape, TopK K, Pad pads, ConstantOfShape, Squeeze/Unsqueeze/Reduce axes, ...) becomes a shape
tensor, and then:
- every optimisation profile must give it min/opt/max *values* (``set_shape_input``), or the
  build stops with "optimization profile is missing values for shape input";
- it lives in host memory at run time (``ICudaEngine.get_tensor_location`` is ``HOST``), so the
  runtime must bind a host buffer for it, not a device buffer.

Values travel from an input to a shape slot through "value-carrying" ops: elementwise integer
arithmetic, casts, Concat/Gather/Slice of the data, Squeeze/Unsqueeze/Reshape of the data, and a
few more (TensorRT's shape-tensor layers are polymorphic: if the output of an elementwise layer
is a shape tensor, so are its inputs). ``Shape`` and ``Size`` read only the shape of their input,
so values stop there; so do ops whose outputs never carry the input's values as integers
(MatMul, Softmax, TopK outputs, custom plugin nodes ...).

The result is recorded per graph in the bundle manifest (``graphs.<g>.shape_inputs``); build-mllm
gives each such input a value range in its profile and the TensorRT backend binds it on the host.
"""

from __future__ import annotations

from collections import defaultdict, deque

import onnx

# op_type -> input slots whose values define a shape (ONNX operator spec, current opsets)
SHAPE_SLOTS: dict[str, tuple[int, ...]] = {
    "Slice": (1, 2, 3, 4), "Range": (0, 1, 2), "Reshape": (1,), "Expand": (1,), "Tile": (1,), "TopK": (1,),
    "Pad": (1, 3), "ConstantOfShape": (0,), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "OneHot": (1,),
    "Resize": (2, 3), "Upsample": (1,),
    **{op: (1,) for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
}

# op_type -> input slots whose values flow into the op's outputs as values (None: every input slot)
VALUE_CARRYING: dict[str, tuple[int, ...] | None] = {
    **{op: None for op in ("Identity", "Cast", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Min", "Max", "Sum",
                           "Floor", "Ceil", "Round", "Sign", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
                           "Not", "And", "Or", "Xor", "Concat", "Gather", "GatherElements", "GatherND", "Where",
                           "Range", "CumSum", "Clip")},
    **{op: (0,) for op in ("Slice", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Expand", "Tile", "Transpose",
                           "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "Split", "Pad")},
}
# Shape and Size read only the shape of their input: the values of a shape tensor never pass them.


def _graph_consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name:
                consumers[name].append((node, slot))
    return consumers


def shape_slot_path(graph: onnx.GraphProto, input_name: str) -> tuple[str, str, int] | None:
    """(node name, op type, slot) of the first shape slot the input's values reach, or None."""
    consumers = _graph_consumers(graph)
    seen = {input_name}
    queue = deque([input_name])
    while queue:
        tensor = queue.popleft()
        for node, slot in consumers.get(tensor, ()):
            if node.domain not in ("", "ai.onnx"):
                continue  # plugin inputs are execution tensors
            if slot in SHAPE_SLOTS.get(node.op_type, ()):
                return node.name or node.op_type, node.op_type, slot
            carrying = VALUE_CARRYING.get(node.op_type, ())
            if carrying is not None and slot not in carrying:
                continue
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    queue.append(out)
    return None


def shape_tensor_inputs(model: onnx.ModelProto | onnx.GraphProto) -> list[str]:
    """Names of the graph inputs TensorRT will treat as shape tensors, in input order."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    initializers = {init.name for init in graph.initializer}
    return [value.name for value in graph.input
            if value.name not in initializers and shape_slot_path(graph, value.name) is not None]
