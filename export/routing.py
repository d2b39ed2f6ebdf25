"""The routing subgraphs of a pruned prefill: rank visual tokens, keep the top k, drop a span,
and for mixture-of-depths write the processed rows back (``token_scatter``).

Each routing step exists in two spellings that compute the same numbers:
``native`` (standard ONNX: MatMul/Softmax for the ranking rows, TopK to select, TopK again to
sort the kept indices ascending, Gather) and ``plugin`` (one ``mllm_deploy`` custom node,
backed by a TensorRT plugin on GPUs and an ONNX Runtime kernel on CPU).

Ranking forms only the attention rows it needs, ``[heads, rows, T]``: the last text row for
FastV/PyramidDrop, visual and text rows for FitPrune. The main attention stays one product.
Positions travel as ``[1, T]`` so every routed tensor has its rows on axis 1.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from mllm_deploy.formats.recipe import ScoreSpec
from mllm_deploy.export import blocks
from mllm_deploy.export.graph import GraphBuilder

MAX = blocks.INT64_MAX
F32_MIN = float(np.finfo(np.float32).min)
ROUTING_MODES = ("native", "plugin")


def _plugin_node(g: GraphBuilder, op_type: str, inputs, outputs: int, **attrs):
    from mllm_deploy.plugins.schemas import DOMAIN, VERSION

    g.custom_domains[DOMAIN] = VERSION
    return g.op(op_type, inputs, outputs=outputs, domain=DOMAIN, plugin_version="1",
                plugin_namespace="mllm_deploy", **attrs)


def _arange(g: GraphBuilder, start: str, end: str) -> str:
    """int64 [start, end) for one-element int64 tensors."""
    one = g.const(np.array(1, np.int64), "const.i64.scalar1")
    return g.op("Range", [g.squeeze(start, [0]), g.squeeze(end, [0]), one])


def visual_score(g: GraphBuilder, mode: str, score: ScoreSpec, q: str, k: str, positions: str, vis_start: str,
                 n_vis: int, num_heads: int, num_kv_heads: int, head_dim: int, ft: int) -> str:
    """Importance of each current visual token, [n_vis] float32 (larger is kept).

    q: [1, H, Tq, Dh] post-RoPE queries of the last Tq <= T tokens (all of them, or only the
    ranking rows); k: [1, Hkv, T, Dh] post-RoPE keys; positions [1, T].
    """
    scale = head_dim**-0.5
    if mode == "plugin":
        return _plugin_node(g, "VisualScore", [q, k, positions, vis_start], 1, n_vis=n_vis,
                            query_rows=score.query_rows, head_reduction=score.head_reduction,
                            combine=score.combine, scale=scale)
    with g.scope("VisualScore"):
        vis_end = g.op("Add", [vis_start, g.ints([n_vis])])
        first_row = {"last_text": g.ints([-1]), "text": vis_end, "visual_and_text": vis_start}[score.query_rows]
        q_rows = g.slice(q, first_row, g.ints([MAX]), axes=[2])  # [1, H, R, Dh]
        key_pos = g.reshape(positions, [-1])  # [T]
        row_pos = g.slice(key_pos, first_row, g.ints([MAX]), axes=[0])  # [R]
        # rankings are computed in float32 whatever the graph's dtype, as the reference and the plugin do.
        # 4-D product with K transposed right at the MatMul (fused by ONNX Runtime and TensorRT)
        q4 = g.reshape(blocks.to_f32(g, q_rows, ft), [1, num_kv_heads, -1, head_dim])  # [1, Hkv, G*R, Dh]
        logits = g.op("MatMul", [q4, g.transpose(blocks.to_f32(g, k, ft), [0, 1, 3, 2])])  # [1, Hkv, G*R, T]
        keys = g.slice(g.op("Shape", [logits]), g.ints([3]), g.ints([4]), axes=[0])
        per_head_shape = g.op("Concat", [g.ints([num_heads, -1]), keys], axis=0)
        logits = g.op("Reshape", [g.op("Mul", [logits, g.scalar(scale, np.float32)]), per_head_shape])  # [H, R, T]
        future = g.op("Greater", [g.unsqueeze(key_pos, [0]), g.unsqueeze(row_pos, [1])])  # [R, T]
        mask = g.op("Where", [future, g.scalar(F32_MIN, np.float32), g.scalar(0.0, np.float32)])
        probs = g.op("Softmax", [g.op("Add", [logits, mask])], axis=-1)  # [H, R, T]
        # reduce heads first, then keep the visual key columns: the copy is [R, n], not [H, R, n]
        reduce_op = "ReduceMax" if score.head_reduction == "max" else "ReduceMean"
        rows = g.slice(g.reduce(reduce_op, probs, [0], keepdims=0), vis_start, vis_end, axes=[1])  # [R, n]
        if score.combine == "single":
            return g.reduce("ReduceMean", rows, [0], keepdims=0)
        # FitPrune: (mass from visual rows / n) x (mass from text rows / #text rows)
        self_mass = g.op("Div", [g.reduce("ReduceSum", g.slice(rows, g.ints([0]), g.ints([n_vis]), axes=[0]), [0],
                                          keepdims=0), g.scalar(float(n_vis), np.float32)])
        text_rows = g.slice(rows, g.ints([n_vis]), g.ints([MAX]), axes=[0])
        count = g.cast(g.slice(g.op("Shape", [text_rows]), g.ints([0]), g.ints([1]), axes=[0]), TensorProto.FLOAT)
        count = g.op("Max", [count, g.const(np.ones([1], np.float32), "const.f32.ones1")])
        cross_mass = g.op("Div", [g.reduce("ReduceSum", text_rows, [0], keepdims=0), count])
        return g.op("Mul", [self_mass, cross_mass])


def token_select(g: GraphBuilder, mode: str, scores: str, vis_start: str, data: str, positions: str,
                 keep: int, n_vis: int) -> tuple[str, str, str]:
    """Keep the ``keep`` best visual rows (in their original order) of data [1, T, D] and positions [1, T].

    Returns (data', positions', rows) with rows the kept global row indices [T - n_vis + keep].
    """
    if mode == "plugin":
        out = _plugin_node(g, "TokenSelect", [scores, vis_start, data, positions], 3, k=keep, n_vis=n_vis)
        return out[0], out[1], out[2]
    with g.scope("TokenSelect"):
        k_const = g.ints([keep])
        best = g.op("TopK", [scores, k_const], outputs=2, axis=-1, largest=1, sorted=1)[1]  # [k]
        # TensorRT has no Sort: order the kept indices ascending with a second TopK.
        as_float = g.cast(best, TensorProto.FLOAT)
        ascending = g.op("TopK", [as_float, k_const], outputs=2, axis=-1, largest=0, sorted=1)[0]
        kept = g.op("Add", [g.cast(ascending, TensorProto.INT64), vis_start])
        vis_end = g.op("Add", [vis_start, g.ints([n_vis])])
        length = g.slice(g.op("Shape", [data]), g.ints([1]), g.ints([2]), axes=[0])
        rows = g.op("Concat", [_arange(g, g.ints([0]), vis_start), kept, _arange(g, vis_end, length)], axis=0)
        return g.op("Gather", [data, rows], axis=1), g.op("Gather", [positions, rows], axis=1), rows


def drop_visual_span(g: GraphBuilder, data: str, positions: str, vis_start: str, n_vis: int) -> tuple[str, str]:
    """VTW: every visual token leaves; slicing needs no routing op in either mode."""
    with g.scope("DropVisual"):
        vis_end = g.op("Add", [vis_start, g.ints([n_vis])])
        keep = lambda t: g.op("Concat", [g.slice(t, g.ints([0]), vis_start, axes=[1]),  # noqa: E731
                                         g.slice(t, vis_end, g.ints([MAX]), axes=[1])], axis=1)
        return keep(data), keep(positions)


def token_scatter(g: GraphBuilder, mode: str, base: str, updates: str, rows: str, skip_scale: str | None = None) -> str:
    """Mixture-of-depths write-back: rows ``rows`` [K] of base [1, T, D] replaced by updates [1, K, D];
    the other rows kept, or multiplied by skip_scale [1, T, 1] when given."""
    if mode == "plugin":
        inputs = [base, updates, rows] + ([skip_scale] if skip_scale is not None else [])
        return _plugin_node(g, "TokenScatter", inputs, 1)
    with g.scope("TokenScatter"):
        if skip_scale is not None:
            base = g.op("Mul", [base, skip_scale])
        # ScatterElements (reduction none) writes element-wise: the row index repeated along D
        index = g.op("Expand", [g.reshape(rows, [1, -1, 1]), g.op("Shape", [updates])])
        return g.op("ScatterElements", [base, index, updates], axis=1)


def scatter_scores(g: GraphBuilder, mode: str, scores: str, kept: str, fresh: str) -> str:
    """scores [n] with the entries ``kept`` [k] replaced by fresh [k] (the attention router's running scores)."""
    if mode == "plugin":
        as_rows = lambda t: g.reshape(t, [1, -1, 1])  # noqa: E731 - TokenScatter moves rows of [1, T, D]
        return g.reshape(_plugin_node(g, "TokenScatter", [as_rows(scores), as_rows(fresh), kept], 1), [-1])
    with g.scope("ScatterScores"):
        return g.op("ScatterElements", [scores, kept, fresh], axis=0)


def expose_selection(g: GraphBuilder, layer: int, scores: str, kept: str, n_vis: int, keep: int) -> None:
    """Graph outputs ``route.{layer}.scores`` [n_vis] float32 and ``route.{layer}.kept`` [keep] int64 (visual-span
    indices, ascending): build-mllm --verify compares two backends' selections with them and tells a near-tie
    broken differently from a real mismatch. Both tensors exist anyway; the runtime does not read them."""
    g.output(scores, f"route.{layer}.scores", TensorProto.FLOAT, [n_vis])
    g.output(kept, f"route.{layer}.kept", TensorProto.INT64, [keep])


def kept_visual(g: GraphBuilder, rows: str, vis_start: str, keep: int) -> str:
    """Visual-span indices [keep] of the kept visual rows, from TokenSelect's rows."""
    with g.scope("kept_visual"):
        return g.op("Sub", [g.slice(rows, vis_start, g.op("Add", [vis_start, g.ints([keep])]), axes=[0]), vis_start])


def ones_around(g: GraphBuilder, middle: str, vis_start: str, total: str, dtype: int) -> str:
    """[1, T, 1]: ones before ``vis_start``, ``middle`` [1, m, 1], ones up to ``total`` [1] rows."""
    with g.scope("ones_around"):
        one = g.const(np.ones([1, 1, 1], blocks.NP_FLOAT[dtype]), f"const.{np.dtype(blocks.NP_FLOAT[dtype]).name}.ones111")
        middle_len = g.slice(g.op("Shape", [middle]), g.ints([1]), g.ints([2]), axes=[0])
        tail = g.op("Sub", [total, g.op("Add", [vis_start, middle_len])])
        shape = lambda n: g.op("Concat", [g.ints([1]), n, g.ints([1])], axis=0)  # noqa: E731
        return g.op("Concat", [g.op("Expand", [one, shape(vis_start)]), middle, g.op("Expand", [one, shape(tail)])],
                    axis=1)
