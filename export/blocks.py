"""Building blocks of the LLaVA graphs: norms, activations, attention, MLPs.

Each function adds nodes to a :class:`GraphBuilder` under the current scope and returns
the name of its output tensor. ``ft`` is the graph's float type (FLOAT or FLOAT16); where
Hugging Face computes in float32 regardless of the model dtype (RMSNorm, softmax), so do we.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from mllm_deploy.export.graph import GraphBuilder

NP_FLOAT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
INT64_MAX = np.iinfo(np.int64).max


def to_f32(g: GraphBuilder, x: str, ft: int) -> str:
    return x if ft == TensorProto.FLOAT else g.cast(x, TensorProto.FLOAT)


def from_f32(g: GraphBuilder, x: str, ft: int) -> str:
    return x if ft == TensorProto.FLOAT else g.cast(x, ft)


def linear(g: GraphBuilder, x: str, weights: dict, prefix: str, name: str) -> str:
    with g.scope(name):
        y = g.op("MatMul", [x, g.const(weights[f"{prefix}.weight"], name=f"{prefix}.weight")])
        if f"{prefix}.bias" in weights:
            y = g.op("Add", [y, g.const(weights[f"{prefix}.bias"], name=f"{prefix}.bias")])
    return y


def layer_norm(g: GraphBuilder, x: str, weights: dict, prefix: str, eps: float, name: str) -> str:
    w = g.const(weights[f"{prefix}.weight"], name=f"{prefix}.weight")
    b = g.const(weights[f"{prefix}.bias"], name=f"{prefix}.bias")
    return g.op("LayerNormalization", [x, w, b], name=name, axis=-1, epsilon=eps, stash_type=1)


def rms_norm(g: GraphBuilder, x: str, weight_name: str, weights: dict, eps: float, ft: int, name: str) -> str:
    """Llama RMSNorm: float32 statistics, result cast back, then scaled by the weight."""
    with g.scope(name):
        xf = to_f32(g, x, ft)
        var = g.reduce_mean(g.op("Mul", [xf, xf]), axes=[-1])
        denom = g.op("Sqrt", [g.op("Add", [var, g.scalar(eps, np.float32)])])
        y = from_f32(g, g.op("Div", [xf, denom]), ft)
        return g.op("Mul", [g.const(weights[weight_name], name=weight_name), y])


def activation(g: GraphBuilder, x: str, kind: str, ft: int) -> str:
    dt = NP_FLOAT[ft]
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])], name="silu")
    if kind == "relu":
        return g.op("Relu", [x])
    if kind == "quick_gelu":
        return g.op("Mul", [x, g.op("Sigmoid", [g.op("Mul", [x, g.scalar(1.702, dt)])])], name="quick_gelu")
    if kind == "gelu":
        with g.scope("gelu"):
            erf = g.op("Erf", [g.op("Mul", [x, g.scalar(1 / np.sqrt(2.0), dt)])])
            return g.op("Mul", [g.op("Mul", [x, g.scalar(0.5, dt)]), g.op("Add", [erf, g.scalar(1.0, dt)])])
    if kind in ("gelu_pytorch_tanh", "gelu_new"):
        with g.scope("gelu_tanh"):
            cube = g.op("Mul", [g.op("Mul", [x, x]), x])
            inner = g.op("Add", [x, g.op("Mul", [cube, g.scalar(0.044715, dt)])])
            t = g.op("Tanh", [g.op("Mul", [inner, g.scalar(np.sqrt(2.0 / np.pi), dt)])])
            return g.op("Mul", [g.op("Mul", [x, g.scalar(0.5, dt)]), g.op("Add", [t, g.scalar(1.0, dt)])])
    raise ValueError(f"unsupported activation {kind}")


def softmax_f32(g: GraphBuilder, scores_f32: str, ft: int) -> str:
    return from_f32(g, g.op("Softmax", [scores_f32], axis=-1), ft)


def rotate_half(g: GraphBuilder, x: str, head_dim: int) -> str:
    half = head_dim // 2
    with g.scope("rotate_half"):
        x1 = g.slice(x, g.ints([0]), g.ints([half]), axes=[-1])
        x2 = g.slice(x, g.ints([half]), g.ints([head_dim]), axes=[-1])
        return g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)


def apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    """x * cos + rotate_half(x) * sin, as Llama does."""
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotate_half(g, x, head_dim), sin])], name="rope")
