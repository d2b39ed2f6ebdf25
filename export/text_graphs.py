"""prefill.onnx and decode.onnx: the Llama-family decoder with per-layer KV caches.

Prefill: ``input_ids [1, T]``, ``image_features [1, N, d]``, ``image_start [1]`` ->
``logits [1, V]`` (last position only) and ``present.{l}.key|value [1, Hkv, T_l, Dh]``
where ``T_l`` is the number of tokens layer ``l`` processed.

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

F32_MIN = float(np.finfo(np.float32).min)


def _qkv(g: GraphBuilder, spec: ModelSpec, w: dict, l: int, h: str, cos: str, sin: str):
    """Projections and RoPE: q [1, H, T, Dh], k and v [1, Hkv, T, Dh]."""
    t = spec.text
    dh = t.head_dim
    qkv = blocks.linear(g, h, w, f"text.layers.{l}.attn.qkv", "qkv_proj")
    q, k, v = g.split(qkv, [t.num_heads * dh, t.num_kv_heads * dh, t.num_kv_heads * dh], axis=-1)
    q = g.transpose(g.reshape(q, [1, -1, t.num_heads, dh]), [0, 2, 1, 3])
    k = g.transpose(g.reshape(k, [1, -1, t.num_kv_heads, dh]), [0, 2, 1, 3])
    v = g.transpose(g.reshape(v, [1, -1, t.num_kv_heads, dh]), [0, 2, 1, 3])
    with g.scope("q"):
        q = blocks.apply_rope(g, q, cos, sin, dh)
    with g.scope("k"):
        k = blocks.apply_rope(g, k, cos, sin, dh)
    return q, k, v


def _merge_heads(g: GraphBuilder, spec: ModelSpec, ctx5: str) -> str:
    """[1, Hkv, G, T, Dh] -> [1, T, H*Dh]."""
    t = spec.text
    ctx = g.reshape(ctx5, [1, t.num_heads, -1, t.head_dim])
    return g.reshape(g.transpose(ctx, [0, 2, 1, 3]), [1, -1, t.num_heads * t.head_dim])


def _mlp(g: GraphBuilder, spec: ModelSpec, w: dict, l: int, h: str, ft: int) -> str:
    t = spec.text
    with g.scope("mlp"):
        gate_up = blocks.linear(g, h, w, f"text.layers.{l}.mlp.gate_up", "gate_up_proj")
        gate, up = g.split(gate_up, [t.intermediate_size, t.intermediate_size], axis=-1)
        act = g.op("Mul", [blocks.activation(g, gate, t.hidden_act, ft), up])
        return blocks.linear(g, act, w, f"text.layers.{l}.mlp.down", "down_proj")


def arange(g: GraphBuilder, count: str) -> str:
    """0..count-1 as int64 for a scalar int64 tensor ``count``."""
    zero = g.const(np.array(0, np.int64), "const.i64.scalar0")
    one = g.const(np.array(1, np.int64), "const.i64.scalar1")
    return g.op("Range", [zero, count, one])


def causal_mask(g: GraphBuilder, positions: str) -> str:
    """[T, T] float32 additive mask from (original) position ids: key after query is masked."""
    with g.scope("causal_mask"):
        later = g.op("Greater", [g.unsqueeze(positions, [0]), g.unsqueeze(positions, [1])])
        return g.op("Where", [later, g.scalar(F32_MIN, np.float32), g.scalar(0.0, np.float32)])


def prefill_attention(g: GraphBuilder, spec: ModelSpec, q: str, k: str, v: str, mask: str, ft: int) -> str:
    """Dense causal attention, GQA by broadcasting KV heads over query groups."""
    t = spec.text
    groups = t.num_heads // t.num_kv_heads
    dt = blocks.NP_FLOAT[ft]
    q5 = g.reshape(q, [1, t.num_kv_heads, groups, -1, t.head_dim])  # [1, Hkv, G, T, Dh]
    k_t = g.transpose(g.unsqueeze(k, [2]), [0, 1, 2, 4, 3])  # [1, Hkv, 1, Dh, T]
    scores = g.op("Mul", [g.op("MatMul", [q5, k_t]), g.scalar(t.head_dim**-0.5, dt)])
    scores = g.op("Add", [blocks.to_f32(g, scores, ft), mask])
    probs = blocks.softmax_f32(g, scores, ft)
    return _merge_heads(g, spec, g.op("MatMul", [probs, g.unsqueeze(v, [2])]))


def layer_attention(g, spec: ModelSpec, w: dict, l: int, x: str, cos: str, sin: str, mask: str, ft: int):
    """Input norm, projections and causal attention of layer l: (q, k, v, ctx [1, T, H*Dh])."""
    h = blocks.rms_norm(g, x, f"text.layers.{l}.input_norm.weight", w, spec.text.rms_norm_eps, ft, "input_layernorm")
    with g.scope("attn"):
        q, k, v = _qkv(g, spec, w, l, h, cos, sin)
        ctx = prefill_attention(g, spec, q, k, v, mask, ft)
    return q, k, v, ctx


def layer_finish(g, spec: ModelSpec, w: dict, l: int, x: str, ctx: str, ft: int, mlp_scale: str | None = None) -> str:
    """o_proj with the residual, then the MLP block (its output times ``mlp_scale`` [1, T, 1] when given:
    mixture-of-depths routers that weight their selected tokens)."""
    with g.scope("attn"):
        x = g.op("Add", [x, blocks.linear(g, ctx, w, f"text.layers.{l}.attn.o", "o_proj")])
    h = blocks.rms_norm(g, x, f"text.layers.{l}.post_norm.weight", w, spec.text.rms_norm_eps, ft, "post_attention_layernorm")
    mlp = _mlp(g, spec, w, l, h, ft)
    if mlp_scale is not None:
        mlp = g.op("Mul", [mlp, mlp_scale], name="mlp_scale")
    return g.op("Add", [x, mlp])


def decoder_layer_decode(g, spec, w, l, x, cos, sin, past_k, past_v, past_len, ft):
    """One decoder layer for one new token against the layer's static cache buffer."""
    t = spec.text
    groups = t.num_heads // t.num_kv_heads
    dt = blocks.NP_FLOAT[ft]
    eps = t.rms_norm_eps
    with g.scope(f"layers.{l}"):
        h = blocks.rms_norm(g, x, f"text.layers.{l}.input_norm.weight", w, eps, ft, "input_layernorm")
        with g.scope("attn"):
            q, k, v = _qkv(g, spec, w, l, h, cos, sin)
            q4 = g.reshape(q, [1, t.num_kv_heads, groups, t.head_dim])  # [1, Hkv, G, Dh]
            # Buffer as the left operand: K is read in place, only the tiny product is transposed.
            s_past = g.transpose(g.op("MatMul", [past_k, g.transpose(q4, [0, 1, 3, 2])]), [0, 1, 3, 2])  # [1,Hkv,G,C]
            s_new = g.op("MatMul", [q4, g.transpose(k, [0, 1, 3, 2])])  # [1, Hkv, G, 1]
            scores = g.op("Mul", [g.op("Concat", [s_past, s_new], axis=-1), g.scalar(t.head_dim**-0.5, dt)])
            with g.scope("cache_mask"):
                capacity = g.slice(g.op("Shape", [past_k]), g.ints([2]), g.ints([3]), axes=[0])
                slots = arange(g, g.squeeze(capacity, [0]))
                empty = g.op("Not", [g.op("Less", [slots, past_len])])
                mask = g.op("Where", [empty, g.scalar(F32_MIN, np.float32), g.scalar(0.0, np.float32)])
                mask = g.op("Concat", [mask, g.const(np.zeros([1], np.float32), "const.f32.zeros1")], axis=0)
            probs = blocks.softmax_f32(g, g.op("Add", [blocks.to_f32(g, scores, ft), mask]), ft)
            p_past = g.slice(probs, g.ints([0]), capacity, axes=[-1])
            p_new = g.slice(probs, g.ints([-1]), g.ints([blocks.INT64_MAX]), axes=[-1])
            ctx = g.op("Add", [g.op("MatMul", [p_past, past_v]), g.op("MatMul", [p_new, v])])  # [1, Hkv, G, Dh]
            ctx = g.reshape(ctx, [1, 1, t.num_heads * t.head_dim])
            x = g.op("Add", [x, blocks.linear(g, ctx, w, f"text.layers.{l}.attn.o", "o_proj")])
        h = blocks.rms_norm(g, x, f"text.layers.{l}.post_norm.weight", w, eps, ft, "post_attention_layernorm")
        x = g.op("Add", [x, _mlp(g, spec, w, l, h, ft)])
    return x, k, v


def lm_head(g: GraphBuilder, spec: ModelSpec, w: dict, x_last: str, ft: int) -> str:
    """[1, 1, d] -> float32 logits [1, V]."""
    x = blocks.rms_norm(g, x_last, "text.norm.weight", w, spec.text.rms_norm_eps, ft, "norm")
    logits = g.op("MatMul", [x, g.const(w["lm_head.weight"], name="lm_head.weight")], name="lm_head")
    return blocks.to_f32(g, g.reshape(logits, [1, spec.text.vocab_size]), ft)


def rope_gather(g: GraphBuilder, tables: tuple[str, str], positions: str) -> tuple[str, str]:
    with g.scope("rope"):
        return g.op("Gather", [tables[0], positions], axis=0), g.op("Gather", [tables[1], positions], axis=0)


def build_prefill_graph(g: GraphBuilder, spec: ModelSpec, w: dict, rope: tuple[np.ndarray, np.ndarray], ft: int,
                        recipe=None, routing: str = "native") -> None:
    """The prefill graph with the recipe applied (see export/pruned_prefill.py, export/mod_prefill.py)."""
    from mllm_deploy.formats.recipe import dense_recipe
    from mllm_deploy.export.pruned_prefill import PrefillBuilder

    recipe = recipe or dense_recipe(spec)
    if recipe.is_mod:
        from mllm_deploy.export.mod_prefill import ModPrefillBuilder

        ModPrefillBuilder(g, spec, w, rope, ft, recipe, routing).build()
    else:
        PrefillBuilder(g, spec, w, rope, ft, recipe, routing).build()


def build_decode_graph(g: GraphBuilder, spec: ModelSpec, w: dict, rope: tuple[np.ndarray, np.ndarray], ft: int) -> None:
    t = spec.text
    ids = g.input("input_ids", TensorProto.INT64, [1, 1])
    pos = g.input("position_ids", TensorProto.INT64, [1, 1])
    past_lengths = g.input("past_lengths", TensorProto.INT64, [t.num_layers])
    past = [
        (
            g.input(f"past.{l}.key", ft, [1, t.num_kv_heads, f"past_len_{l}", t.head_dim]),
            g.input(f"past.{l}.value", ft, [1, t.num_kv_heads, f"past_len_{l}", t.head_dim]),
        )
        for l in range(t.num_layers)
    ]
    tables = (g.const(rope[0], name="rope.cos"), g.const(rope[1], name="rope.sin"))
    with g.scope("model"):
        x = g.op("Gather", [g.const(w["text.embed_tokens"], name="text.embed_tokens"), ids], axis=0, name="embed")
        cos, sin = rope_gather(g, tables, pos)  # [1, 1, Dh]
        cos, sin = g.unsqueeze(cos, [1]), g.unsqueeze(sin, [1])  # [1, 1, 1, Dh]
        for l in range(t.num_layers):
            past_len = g.slice(past_lengths, g.ints([l]), g.ints([l + 1]), axes=[0])
            x, k, v = decoder_layer_decode(g, spec, w, l, x, cos, sin, past[l][0], past[l][1], past_len, ft)
            g.output(k, f"new.{l}.key", ft, [1, t.num_kv_heads, 1, t.head_dim])
            g.output(v, f"new.{l}.value", ft, [1, t.num_kv_heads, 1, t.head_dim])
        g.output(lm_head(g, spec, w, x, ft), "logits", TensorProto.FLOAT, [1, t.vocab_size])
