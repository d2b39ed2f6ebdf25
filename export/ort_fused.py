"""The onnxruntime-target spelling of the decoder's hot paths: ONNX Runtime's fused operators.

The portable graphs (TensorRT's target) spell RMSNorm, RoPE and attention in standard ops. ONNX Runtime runs
those as dozens of small kernels per layer (Transposes around every head reshape, RoPE as Slice/Neg/Concat/
Mul/Add, RMSNorm as five elementwise passes). The onnxruntime target emits, for the same weights:

- ``SimplifiedLayerNormalization`` for RMSNorm and ``SkipSimplifiedLayerNormalization`` for a residual add and
  the norm after it (export/blocks.py emits both for this target);
- ``com.microsoft.GroupQueryAttention`` on the fused qkv projection [1, T, (H + 2 Hkv) Dh]: causal attention with
  grouped KV heads, its output already [1, T, H Dh], its KV [1, Hkv, T, Dh] (the manifest's present layout).

RoPE positions: GQA rotates with the positions 0..T-1 (prefill) or with ``position_ids`` (decode). A layer whose
tokens are not the contiguous prompt (after a pruning or mixture-of-depths selection, where tokens keep their
original position ids) rotates q and k itself with ``com.microsoft.RotaryEmbedding`` on explicit positions and
then runs GQA without rotation: index-causal attention is position-causal there, since selections keep their
tokens in ascending order.

Decode writes the new token's KV into the layer's static buffer in place (GQA's shared past/present buffer):
``present.{l}.*`` is the ``past.{l}.*`` buffer itself, which the runtime binds as both input and output.
Checked against the portable graphs by the export's verification and tests/test_ort_target.py.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from mllm_deploy.export import blocks
from mllm_deploy.export.graph import GraphBuilder

MS_DOMAIN = "com.microsoft"
TARGETS = ("portable", "onnxruntime")


def unsupported(spec) -> str | None:
    """Why the onnxruntime target cannot express this model (None when it can)."""
    if spec.text.head_dim % 8:
        return f"head_dim {spec.text.head_dim} is not a multiple of 8, which GroupQueryAttention needs"
    return None


def rope_caches(graph: GraphBuilder, rope: tuple[np.ndarray, np.ndarray]) -> tuple[str, str]:
    """GQA's and RotaryEmbedding's cos/sin caches [max_positions, Dh/2]: the first half of Llama's tables (whose
    halves repeat), in the graph's float type."""
    half = rope[0].shape[1] // 2
    return (graph.const(np.ascontiguousarray(rope[0][:, :half]), name="rope.cos_cache"),
            graph.const(np.ascontiguousarray(rope[1][:, :half]), name="rope.sin_cache"))


def _lengths(graph: GraphBuilder, hidden: str) -> tuple[str, str]:
    """GQA's seqlens_k ([1] int32, total length - 1) and total_sequence_length (int32 scalar) of a prompt pass."""
    with graph.scope("lengths"):
        length = graph.slice(graph.op("Shape", [hidden]), graph.ints([1]), graph.ints([2]), axes=[0])
        seqlens = graph.cast(graph.op("Sub", [length, graph.ints([1])]), TensorProto.INT32)
        total = graph.cast(graph.squeeze(length, [0]), TensorProto.INT32)
    return seqlens, total


def prefill_attention(graph: GraphBuilder, spec, weights: dict, layer: int, hidden: str, positions: str,
                      contiguous: bool, caches: tuple[str, str], float_type: int) -> tuple[str, str, str]:
    """Projections, RoPE and causal attention of the (normed) tokens: (ctx [1, T, H Dh], key, value)."""
    text = spec.text
    qkv = blocks.linear(graph, hidden, weights, f"text.layers.{layer}.attn.qkv", "qkv_proj")
    seqlens, total = _lengths(graph, hidden)
    attrs = dict(num_heads=text.num_heads, kv_num_heads=text.num_kv_heads, scale=float(text.head_dim**-0.5))
    if contiguous:
        return graph.typed(graph.op("GroupQueryAttention", [qkv, "", "", "", "", seqlens, total, *caches],
                                    outputs=3, domain=MS_DOMAIN, do_rotary=1, **attrs), float_type)
    q, k, v = graph.split(qkv, [text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim,
                                text.num_kv_heads * text.head_dim], axis=-1)
    q = graph.typed(graph.op("RotaryEmbedding", [q, positions, *caches], name="rope_q", domain=MS_DOMAIN,
                             num_heads=text.num_heads, interleaved=0), float_type)
    k = graph.typed(graph.op("RotaryEmbedding", [k, positions, *caches], name="rope_k", domain=MS_DOMAIN,
                             num_heads=text.num_kv_heads, interleaved=0), float_type)
    return graph.typed(graph.op("GroupQueryAttention", [q, k, v, "", "", seqlens, total], outputs=3,
                                domain=MS_DOMAIN, do_rotary=0, **attrs), float_type)


def decode_lengths(graph: GraphBuilder, past_lengths: str, num_layers: int) -> list[tuple[str, str]]:
    """Per layer, GQA's seqlens_k (the valid entries before the new one) and total_sequence_length, both [1]
    int32, from the decode graph's past_lengths [L] int64: four nodes for the whole graph."""
    with graph.scope("lengths"):
        seqlens = graph.cast(past_lengths, TensorProto.INT32)
        totals = graph.op("Add", [seqlens, graph.const(np.array([1], np.int32), "const.i32.one")])
        if num_layers == 1:
            return [(seqlens, totals)]
        return list(zip(graph.split(seqlens, [1] * num_layers, axis=0), graph.split(totals, [1] * num_layers, axis=0)))


def decode_attention(graph: GraphBuilder, spec, weights: dict, layer: int, hidden: str, position_ids: str,
                     past_key: str, past_value: str, lengths: tuple[str, str], caches: tuple[str, str],
                     float_type: int) -> tuple[str, str, str]:
    """One new token against the layer's static buffer, written in place at slot seqlens_k:
    (ctx [1, 1, H Dh], present key, present value), the presents being the past buffers."""
    text = spec.text
    qkv = blocks.linear(graph, hidden, weights, f"text.layers.{layer}.attn.qkv", "qkv_proj")
    return graph.typed(graph.op(
        "GroupQueryAttention", [qkv, "", "", past_key, past_value, *lengths, *caches, position_ids],
        outputs=3, domain=MS_DOMAIN, do_rotary=1, num_heads=text.num_heads, kv_num_heads=text.num_kv_heads,
        scale=float(text.head_dim**-0.5)), float_type)
