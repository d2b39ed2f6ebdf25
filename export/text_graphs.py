"""prefill.onnx and decode.onnx: the Llama-family decoder with per-layer KV caches.

Prefill: ``input_ids [1, T]``, ``image_features [1, N, d]``, ``image_start [1]`` ->
``logits [1, V]`` (last position only) and ``present.{l}.key|value [1, Hkv, T_l, Dh]``
where ``T_l`` is the number of tokens layer ``l`` processed. This module holds the layer
pieces the prefill builders (export/prefill.py) put together, and the decode graph.

Decode (static cache, gpt-fast style): ``input_ids [1, 1]``, ``position_ids [1, 1]``,
``past_lengths [L]`` (valid entries per layer) and ``past.{l}.key|value [1, Hkv, C_l, Dh]``
(the runtime's preallocated buffers, capacity ``C_l`` each) -> ``logits [1, V]`` and
``new.{l}.key|value [1, Hkv, 1, Dh]``, which the runtime writes at slot ``past_lengths[l]``.
The cache is never concatenated: attention is split into a product over the buffer
(masked past the valid length) and one over the new token, joined in a softmax.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from mllm_deploy.export import blocks
from mllm_deploy.export.graph import GraphBuilder
from mllm_deploy.formats.geometry import ModelSpec
from mllm_deploy.formats.manifest import new_name, past_name, present_name

F32_MIN = float(np.finfo(np.float32).min)


def _qkv(graph: GraphBuilder, spec: ModelSpec, weights: dict, layer: int, hidden: str, cos: str, sin: str):
    """Projections and RoPE: q [1, H, T, Dh], k and v [1, Hkv, T, Dh]."""
    text = spec.text
    head_dim = text.head_dim
    qkv = blocks.linear(graph, hidden, weights, f"text.layers.{layer}.attn.qkv", "qkv_proj")
    q, k, v = graph.split(qkv, [text.num_heads * head_dim, text.num_kv_heads * head_dim,
                                text.num_kv_heads * head_dim], axis=-1)
    q = graph.transpose(graph.reshape(q, [1, -1, text.num_heads, head_dim]), [0, 2, 1, 3])
    k = graph.transpose(graph.reshape(k, [1, -1, text.num_kv_heads, head_dim]), [0, 2, 1, 3])
    v = graph.transpose(graph.reshape(v, [1, -1, text.num_kv_heads, head_dim]), [0, 2, 1, 3])
    with graph.scope("q"):
        q = blocks.apply_rope(graph, q, cos, sin, head_dim)
    with graph.scope("k"):
        k = blocks.apply_rope(graph, k, cos, sin, head_dim)
    return q, k, v


def _merge_heads(graph: GraphBuilder, spec: ModelSpec, ctx5: str) -> str:
    """[1, Hkv, G, T, Dh] -> [1, T, H*Dh]."""
    text = spec.text
    ctx = graph.reshape(ctx5, [1, text.num_heads, -1, text.head_dim])
    return graph.reshape(graph.transpose(ctx, [0, 2, 1, 3]), [1, -1, text.num_heads * text.head_dim])


def _mlp(graph: GraphBuilder, spec: ModelSpec, weights: dict, layer: int, hidden: str, float_type: int) -> str:
    text = spec.text
    with graph.scope("mlp"):
        # gate and up as two products: a fused one would need a Split, a copy of its whole output, after it
        gate = blocks.linear(graph, hidden, weights, f"text.layers.{layer}.mlp.gate", "gate_proj")
        up = blocks.linear(graph, hidden, weights, f"text.layers.{layer}.mlp.up", "up_proj")
        act = graph.op("Mul", [blocks.activation(graph, gate, text.hidden_act, float_type), up])
        return blocks.linear(graph, act, weights, f"text.layers.{layer}.mlp.down", "down_proj")


def arange(graph: GraphBuilder, count: str) -> str:
    """0..count-1 as int64 for a scalar int64 tensor ``count``."""
    zero = graph.const(np.array(0, np.int64), "const.i64.scalar0")
    one = graph.const(np.array(1, np.int64), "const.i64.scalar1")
    return graph.op("Range", [zero, count, one])


def causal_mask(graph: GraphBuilder, positions: str) -> str:
    """[T, T] float32 additive mask from (original) position ids: key after query is masked."""
    with graph.scope("causal_mask"):
        later = graph.op("Greater", [graph.unsqueeze(positions, [0]), graph.unsqueeze(positions, [1])])
        return graph.op("Where", [later, graph.scalar(F32_MIN, np.float32), graph.scalar(0.0, np.float32)])


def prefill_attention(graph: GraphBuilder, spec: ModelSpec, q: str, k: str, v: str, mask: str, float_type: int) -> str:
    """Dense causal attention, GQA by broadcasting KV heads over query groups."""
    text = spec.text
    groups = text.num_heads // text.num_kv_heads
    dtype = blocks.NP_FLOAT[float_type]
    q5 = graph.reshape(q, [1, text.num_kv_heads, groups, -1, text.head_dim])  # [1, Hkv, G, T, Dh]
    k_t = graph.transpose(graph.unsqueeze(k, [2]), [0, 1, 2, 4, 3])  # [1, Hkv, 1, Dh, T]
    scores = graph.op("Mul", [graph.op("MatMul", [q5, k_t]), graph.scalar(text.head_dim**-0.5, dtype)])
    scores = graph.op("Add", [blocks.to_f32(graph, scores, float_type), mask])
    probs = blocks.softmax_f32(graph, scores, float_type)
    return _merge_heads(graph, spec, graph.op("MatMul", [probs, graph.unsqueeze(v, [2])]))


def layer_attention(graph: GraphBuilder, spec: ModelSpec, weights: dict, layer: int, x: str, cos: str, sin: str,
                    mask: str, float_type: int):
    """Input norm, projections and causal attention of a layer: (q, k, v, ctx [1, T, H*Dh])."""
    hidden = blocks.rms_norm(graph, x, f"text.layers.{layer}.input_norm.weight", weights, spec.text.rms_norm_eps,
                             float_type, "input_layernorm")
    with graph.scope("attn"):
        q, k, v = _qkv(graph, spec, weights, layer, hidden, cos, sin)
        ctx = prefill_attention(graph, spec, q, k, v, mask, float_type)
    return q, k, v, ctx


def layer_finish(graph: GraphBuilder, spec: ModelSpec, weights: dict, layer: int, x: str, ctx: str, float_type: int,
                 mlp_scale: str | None = None) -> str:
    """o_proj with the residual, then the MLP block (its output times ``mlp_scale`` [1, T, 1] when given:
    mixture-of-depths routers that weight their selected tokens)."""
    with graph.scope("attn"):
        attn_out = blocks.linear(graph, ctx, weights, f"text.layers.{layer}.attn.o", "o_proj")
    hidden, x = blocks.residual_rms_norm(graph, x, attn_out, f"text.layers.{layer}.post_norm.weight", weights,
                                         spec.text.rms_norm_eps, float_type, "post_attention_layernorm")
    mlp = _mlp(graph, spec, weights, layer, hidden, float_type)
    if mlp_scale is not None:
        mlp = graph.op("Mul", [mlp, mlp_scale], name="mlp_scale")
    return graph.op("Add", [x, mlp])


def layer_mlp_only(graph: GraphBuilder, spec: ModelSpec, weights: dict, layer: int, x: str, float_type: int) -> str:
    """A layer whose attention is skipped (EAS): x + MLP(post_norm(x)); it reads and writes no KV."""
    hidden = blocks.rms_norm(graph, x, f"text.layers.{layer}.post_norm.weight", weights, spec.text.rms_norm_eps,
                             float_type, "post_attention_layernorm")
    return graph.op("Add", [x, _mlp(graph, spec, weights, layer, hidden, float_type)])


def decoder_layer_decode(graph: GraphBuilder, spec: ModelSpec, weights: dict, layer: int, x: str, cos: str, sin: str,
                         past_key: str, past_value: str, past_len: str, float_type: int):
    """One decoder layer for one new token against the layer's static cache buffer."""
    text = spec.text
    groups = text.num_heads // text.num_kv_heads
    dtype = blocks.NP_FLOAT[float_type]
    eps = text.rms_norm_eps
    with graph.scope(f"layers.{layer}"):
        hidden = blocks.rms_norm(graph, x, f"text.layers.{layer}.input_norm.weight", weights, eps, float_type,
                                 "input_layernorm")
        with graph.scope("attn"):
            q, k, v = _qkv(graph, spec, weights, layer, hidden, cos, sin)
            q4 = graph.reshape(q, [1, text.num_kv_heads, groups, text.head_dim])  # [1, Hkv, G, Dh]
            # Buffer as the left operand: K is read in place, only the tiny product is transposed.
            past_product = graph.op("MatMul", [past_key, graph.transpose(q4, [0, 1, 3, 2])])
            s_past = graph.transpose(past_product, [0, 1, 3, 2])  # [1, Hkv, G, C]
            s_new = graph.op("MatMul", [q4, graph.transpose(k, [0, 1, 3, 2])])  # [1, Hkv, G, 1]
            scores = graph.op("Mul", [graph.op("Concat", [s_past, s_new], axis=-1),
                                      graph.scalar(text.head_dim**-0.5, dtype)])
            with graph.scope("cache_mask"):
                capacity = graph.slice(graph.op("Shape", [past_key]), graph.ints([2]), graph.ints([3]), axes=[0])
                slots = arange(graph, graph.squeeze(capacity, [0]))
                empty = graph.op("Not", [graph.op("Less", [slots, past_len])])
                mask = graph.op("Where", [empty, graph.scalar(F32_MIN, np.float32), graph.scalar(0.0, np.float32)])
                mask = graph.op("Concat", [mask, graph.const(np.zeros([1], np.float32), "const.f32.zeros1")], axis=0)
            probs = blocks.softmax_f32(graph, graph.op("Add", [blocks.to_f32(graph, scores, float_type), mask]),
                                       float_type)
            p_past = graph.slice(probs, graph.ints([0]), capacity, axes=[-1])
            p_new = graph.slice(probs, graph.ints([-1]), graph.ints([blocks.INT64_MAX]), axes=[-1])
            ctx = graph.op("Add", [graph.op("MatMul", [p_past, past_value]),
                                   graph.op("MatMul", [p_new, v])])  # [1, Hkv, G, Dh]
            ctx = graph.reshape(ctx, [1, 1, text.num_heads * text.head_dim])
            x = graph.op("Add", [x, blocks.linear(graph, ctx, weights, f"text.layers.{layer}.attn.o", "o_proj")])
        hidden = blocks.rms_norm(graph, x, f"text.layers.{layer}.post_norm.weight", weights, eps, float_type,
                                 "post_attention_layernorm")
        x = graph.op("Add", [x, _mlp(graph, spec, weights, layer, hidden, float_type)])
    return x, k, v


def lm_head(graph: GraphBuilder, spec: ModelSpec, weights: dict, x_last: str, float_type: int) -> str:
    """[1, 1, d] -> float32 logits [1, V]."""
    x = blocks.rms_norm(graph, x_last, "text.norm.weight", weights, spec.text.rms_norm_eps, float_type, "norm")
    with graph.scope("lm_head"):
        logits = graph.op("MatMul", [x, blocks.weight_matrix(graph, weights, "lm_head")], name="MatMul")
    return blocks.to_f32(graph, graph.reshape(logits, [1, spec.text.vocab_size]), float_type)


def rope_gather(graph: GraphBuilder, tables: tuple[str, str], positions: str) -> tuple[str, str]:
    with graph.scope("rope"):
        return graph.op("Gather", [tables[0], positions], axis=0), graph.op("Gather", [tables[1], positions], axis=0)


def build_decode_graph(graph: GraphBuilder, spec: ModelSpec, weights: dict, rope: tuple[np.ndarray, np.ndarray],
                       float_type: int, skip_attention: tuple[int, ...] | list[int] = ()) -> None:
    """``skip_attention``: layers without attention (EAS): no past inputs, no new entries, MLP only."""
    text = spec.text
    skipped = set(skip_attention)
    ids = graph.input("input_ids", TensorProto.INT64, [1, 1])
    positions = graph.input("position_ids", TensorProto.INT64, [1, 1])
    past_lengths = graph.input("past_lengths", TensorProto.INT64, [text.num_layers])
    past = [
        None if layer in skipped else
        tuple(graph.input(past_name(layer, part), float_type,
                          [1, text.num_kv_heads, f"past_len_{layer}", text.head_dim]) for part in ("key", "value"))
        for layer in range(text.num_layers)
    ]
    if graph.target == "onnxruntime":
        return _build_fused_decode(graph, spec, weights, rope, float_type, ids, positions, past_lengths, past)
    tables = (graph.const(rope[0], name="rope.cos"), graph.const(rope[1], name="rope.sin"))
    with graph.scope("model"):
        embed = graph.const(weights["text.embed_tokens"], name="text.embed_tokens")
        x = graph.op("Gather", [embed, ids], axis=0, name="embed")
        cos, sin = rope_gather(graph, tables, positions)  # [1, 1, Dh]
        cos, sin = graph.unsqueeze(cos, [1]), graph.unsqueeze(sin, [1])  # [1, 1, 1, Dh]
        for layer in range(text.num_layers):
            if past[layer] is None:
                with graph.scope(f"layers.{layer}"):
                    x = layer_mlp_only(graph, spec, weights, layer, x, float_type)
                continue
            past_len = graph.slice(past_lengths, graph.ints([layer]), graph.ints([layer + 1]), axes=[0])
            past_key, past_value = past[layer]
            x, k, v = decoder_layer_decode(graph, spec, weights, layer, x, cos, sin, past_key, past_value, past_len,
                                           float_type)
            for part, tensor in (("key", k), ("value", v)):
                graph.output(tensor, new_name(layer, part), float_type, [1, text.num_kv_heads, 1, text.head_dim])
        graph.output(lm_head(graph, spec, weights, x, float_type), "logits", TensorProto.FLOAT, [1, text.vocab_size])


def _build_fused_decode(graph: GraphBuilder, spec: ModelSpec, weights: dict, rope, float_type: int, ids: str,
                        positions: str, past_lengths: str, past: list[tuple[str, str]]) -> None:
    """The onnxruntime target's decode: GroupQueryAttention writes the new entry into each layer's buffer in place,
    so the outputs are ``present.{l}.*``, the past buffers themselves (the runtime binds them as both). Each
    residual add is fused with the norm after it, across layers too."""
    from mllm_deploy.export import ort_fused

    text, eps = spec.text, spec.text.rms_norm_eps
    caches = ort_fused.rope_caches(graph, rope)
    with graph.scope("model"):
        embed = graph.const(weights["text.embed_tokens"], name="text.embed_tokens")
        x = graph.op("Gather", [embed, ids], axis=0, name="embed")
        lengths = ort_fused.decode_lengths(graph, past_lengths, text.num_layers)
        delta = None  # the MLP output not yet added to the residual stream
        for layer in range(text.num_layers):
            if past[layer] is None:  # attention skipped (EAS): the pending MLP output joins before this MLP
                with graph.scope(f"layers.{layer}"):
                    post = f"text.layers.{layer}.post_norm.weight"
                    if delta is None:
                        hidden = blocks.rms_norm(graph, x, post, weights, eps, float_type, "post_attention_layernorm")
                    else:
                        hidden, x = blocks.residual_rms_norm(graph, x, delta, post, weights, eps, float_type,
                                                             "post_attention_layernorm")
                    delta = _mlp(graph, spec, weights, layer, hidden, float_type)
                continue
            with graph.scope(f"layers.{layer}"):
                norm = f"text.layers.{layer}.input_norm.weight"
                if delta is None:
                    hidden = blocks.rms_norm(graph, x, norm, weights, eps, float_type, "input_layernorm")
                else:
                    hidden, x = blocks.residual_rms_norm(graph, x, delta, norm, weights, eps, float_type,
                                                         "input_layernorm")
                with graph.scope("attn"):
                    ctx, key, value = ort_fused.decode_attention(graph, spec, weights, layer, hidden, positions,
                                                                 *past[layer], lengths[layer], caches, float_type)
                    attn_out = blocks.linear(graph, ctx, weights, f"text.layers.{layer}.attn.o", "o_proj")
                hidden, x = blocks.residual_rms_norm(graph, x, attn_out, f"text.layers.{layer}.post_norm.weight",
                                                     weights, eps, float_type, "post_attention_layernorm")
                delta = _mlp(graph, spec, weights, layer, hidden, float_type)
            for part, tensor in (("key", key), ("value", value)):
                graph.output(tensor, present_name(layer, part), float_type,
                             [1, text.num_kv_heads, f"past_len_{layer}", text.head_dim])
        final, _ = blocks.residual_rms_norm(graph, x, delta, "text.norm.weight", weights, eps, float_type, "norm")
        with graph.scope("lm_head"):
            logits = graph.op("MatMul", [final, blocks.weight_matrix(graph, weights, "lm_head")], name="MatMul")
        logits = blocks.to_f32(graph, graph.reshape(logits, [1, text.vocab_size]), float_type)
        graph.output(logits, "logits", TensorProto.FLOAT, [1, text.vocab_size])
