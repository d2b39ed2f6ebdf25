"""Building blocks of the LLaVA graphs: norms, activations, attention, MLPs.

Each function adds nodes to a :class:`GraphBuilder` under the current scope and returns
the name of its output tensor. ``float_type`` is the graph's float type (FLOAT or FLOAT16); where
Hugging Face computes in float32 regardless of the model dtype (RMSNorm, softmax), so do we.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from mllm_deploy.export.graph import GraphBuilder

NP_FLOAT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
INT64_MAX = np.iinfo(np.int64).max


def to_f32(graph: GraphBuilder, x: str, float_type: int) -> str:
    return x if float_type == TensorProto.FLOAT else graph.cast(x, TensorProto.FLOAT)


def from_f32(graph: GraphBuilder, x: str, float_type: int) -> str:
    return x if float_type == TensorProto.FLOAT else graph.cast(x, float_type)


def weight_matrix(graph: GraphBuilder, weights: dict, prefix: str) -> str:
    """The [K, N] weight of linear layer ``prefix``: a constant, or, where the graph's quantization scheme covers
    the layer, the DequantizeLinear of its stored integers (export/quantize.py)."""
    name = f"{prefix}.weight"
    if graph.quant is None or not graph.quant.applies(prefix):
        return graph.const(weights[name], name=name)
    q_name, s_name, _ = graph.quantized(weights[name], name)
    if graph.quant.bits == 4:
        return graph.op("DequantizeLinear", [q_name, s_name], name="dequantize", axis=0,
                        block_size=graph.quant.block_size)
    return graph.op("DequantizeLinear", [q_name, s_name], name="dequantize", axis=1)


def linear(graph: GraphBuilder, x: str, weights: dict, prefix: str, name: str) -> str:
    with graph.scope(name):
        y = graph.op("MatMul", [x, weight_matrix(graph, weights, prefix)])
        if f"{prefix}.bias" in weights:
            y = graph.op("Add", [y, graph.const(weights[f"{prefix}.bias"], name=f"{prefix}.bias")])
    return y


def layer_norm(graph: GraphBuilder, x: str, weights: dict, prefix: str, eps: float, name: str) -> str:
    weight = graph.const(weights[f"{prefix}.weight"], name=f"{prefix}.weight")
    bias = graph.const(weights[f"{prefix}.bias"], name=f"{prefix}.bias")
    return graph.op("LayerNormalization", [x, weight, bias], name=name, axis=-1, epsilon=eps, stash_type=1)


def rms_norm(graph: GraphBuilder, x: str, weight_name: str, weights: dict, eps: float, float_type: int,
             name: str) -> str:
    """Llama RMSNorm: float32 statistics, result cast back, then scaled by the weight (one fused node in the
    onnxruntime target)."""
    if graph.target == "onnxruntime":  # statistics in float32 (stash_type 1) as Hugging Face computes them
        weight = graph.const(weights[weight_name], name=weight_name)
        return graph.typed(graph.op("SimplifiedLayerNormalization", [x, weight], name=name, axis=-1,
                                    epsilon=float(eps), stash_type=1), float_type)
    with graph.scope(name):
        x_f32 = to_f32(graph, x, float_type)
        variance = graph.reduce_mean(graph.op("Mul", [x_f32, x_f32]), axes=[-1])
        denom = graph.op("Sqrt", [graph.op("Add", [variance, graph.scalar(eps, np.float32)])])
        normed = from_f32(graph, graph.op("Div", [x_f32, denom]), float_type)
        return graph.op("Mul", [graph.const(weights[weight_name], name=weight_name), normed])


def residual_rms_norm(graph: GraphBuilder, x: str, delta: str, weight_name: str, weights: dict, eps: float,
                      float_type: int, name: str) -> tuple[str, str]:
    """(RMSNorm(x + delta), x + delta): the residual add and the next norm, one fused node in the onnxruntime
    target (SkipSimplifiedLayerNormalization, which ONNX Runtime does not form by itself from the two)."""
    if graph.target != "onnxruntime":
        total = graph.op("Add", [x, delta])
        return rms_norm(graph, total, weight_name, weights, eps, float_type, name), total
    weight = graph.const(weights[weight_name], name=weight_name)
    normed, _, _, total = graph.op("SkipSimplifiedLayerNormalization", [x, delta, weight], name=name, outputs=4,
                                   domain="com.microsoft", epsilon=float(eps))
    graph.typed([normed, total], float_type)
    return normed, total


def activation(graph: GraphBuilder, x: str, kind: str, float_type: int) -> str:
    dtype = NP_FLOAT[float_type]
    if kind == "silu":
        return graph.op("Mul", [x, graph.op("Sigmoid", [x])], name="silu")
    if kind == "relu":
        return graph.op("Relu", [x])
    if kind == "quick_gelu":
        return graph.op("Mul", [x, graph.op("Sigmoid", [graph.op("Mul", [x, graph.scalar(1.702, dtype)])])],
                        name="quick_gelu")
    if kind == "gelu":
        with graph.scope("gelu"):
            erf = graph.op("Erf", [graph.op("Mul", [x, graph.scalar(1 / np.sqrt(2.0), dtype)])])
            return graph.op("Mul", [graph.op("Mul", [x, graph.scalar(0.5, dtype)]),
                                    graph.op("Add", [erf, graph.scalar(1.0, dtype)])])
    if kind in ("gelu_pytorch_tanh", "gelu_new"):
        with graph.scope("gelu_tanh"):
            cube = graph.op("Mul", [graph.op("Mul", [x, x]), x])
            inner = graph.op("Add", [x, graph.op("Mul", [cube, graph.scalar(0.044715, dtype)])])
            tanh = graph.op("Tanh", [graph.op("Mul", [inner, graph.scalar(np.sqrt(2.0 / np.pi), dtype)])])
            return graph.op("Mul", [graph.op("Mul", [x, graph.scalar(0.5, dtype)]),
                                    graph.op("Add", [tanh, graph.scalar(1.0, dtype)])])
    raise ValueError(f"unsupported activation {kind}")


def softmax_f32(graph: GraphBuilder, scores_f32: str, float_type: int) -> str:
    return from_f32(graph, graph.op("Softmax", [scores_f32], axis=-1), float_type)


def rotate_half(graph: GraphBuilder, x: str, head_dim: int) -> str:
    half = head_dim // 2
    with graph.scope("rotate_half"):
        x1 = graph.slice(x, graph.ints([0]), graph.ints([half]), axes=[-1])
        x2 = graph.slice(x, graph.ints([half]), graph.ints([head_dim]), axes=[-1])
        return graph.op("Concat", [graph.op("Neg", [x2]), x1], axis=-1)


def apply_rope(graph: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    """x * cos + rotate_half(x) * sin, as Llama does."""
    return graph.op("Add", [graph.op("Mul", [x, cos]), graph.op("Mul", [rotate_half(graph, x, head_dim), sin])],
                    name="rope")
