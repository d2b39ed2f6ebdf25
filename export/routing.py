"""The routing subgraphs of a pruned prefill: rank visual tokens, keep the top k, drop a span,
and for mixture-of-depths write the processed rows back (``token_scatter``).

Each routing step exists in two spellings that compute the same numbers, two classes with one
interface (:class:`Routing`), chosen once by name (:func:`routing_by_name`):
:class:`NativeRouting` (standard ONNX: MatMul/Softmax for the ranking rows, TopK to select, TopK
again to sort the kept indices ascending, Gather) and :class:`PluginRouting` (one ``mllm_deploy``
custom node, backed by a TensorRT plugin on GPUs and an ONNX Runtime kernel on CPU).

Ranking forms only the attention rows it needs, ``[heads, rows, T]``: the last text row for
FastV/PyramidDrop, visual and text rows for FitPrune. The main attention stays one product.
Positions travel as ``[1, T]`` so every routed tensor has its rows on axis 1.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from onnx import TensorProto

from mllm_deploy.export import blocks
from mllm_deploy.export.graph import GraphBuilder
from mllm_deploy.formats.geometry import TextSpec
from mllm_deploy.formats.manifest import route_names
from mllm_deploy.formats.recipe import ScoreSpec
from mllm_deploy.plugins import schemas

MAX = blocks.INT64_MAX
F32_MIN = float(np.finfo(np.float32).min)


class Routing(Protocol):
    """One spelling of the routing steps; every method adds nodes to ``graph`` and returns tensor names."""

    name: str

    def visual_score(self, graph: GraphBuilder, score: ScoreSpec, queries: str, keys: str, positions: str,
                     vis_start: str, n_vis: int, text: TextSpec, float_type: int) -> str:
        """Importance of each current visual token, [n_vis] float32 (larger is kept).

        queries: [1, H, Tq, Dh] post-RoPE queries of the last Tq <= T tokens (all of them, or only the
        ranking rows); keys: [1, Hkv, T, Dh] post-RoPE keys; positions [1, T].
        """

    def token_select(self, graph: GraphBuilder, scores: str, vis_start: str, data: str, positions: str,
                     keep: int, n_vis: int) -> tuple[str, str, str]:
        """Keep the ``keep`` best visual rows (in their original order) of data [1, T, D] and positions [1, T].

        Returns (data', positions', rows) with rows the kept global row indices [T - n_vis + keep].
        """

    def token_select_pair(self, graph: GraphBuilder, scores: str, vis_start: str, first: str, second: str,
                          positions: str, keep: int, n_vis: int, widths: tuple[int, int]) -> tuple[str, str, str, str]:
        """:meth:`token_select` of two tensors [1, T, widths[i]] that lose the same rows (FitPrune's attention
        output and residual): (first', second', positions', rows)."""

    def token_scatter(self, graph: GraphBuilder, base: str, updates: str, rows: str,
                      skip_scale: str | None = None) -> str:
        """Mixture-of-depths write-back: rows ``rows`` [K] of base [1, T, D] replaced by updates [1, K, D];
        the other rows kept, or multiplied by skip_scale [1, T, 1] when given."""

    def scatter_scores(self, graph: GraphBuilder, scores: str, kept: str, fresh: str) -> str:
        """scores [n] with the entries ``kept`` [k] replaced by fresh [k] (the attention router's running scores)."""


def _arange(graph: GraphBuilder, start: str, end: str) -> str:
    """int64 [start, end) for one-element int64 tensors."""
    one = graph.const(np.array(1, np.int64), "const.i64.scalar1")
    return graph.op("Range", [graph.squeeze(start, [0]), graph.squeeze(end, [0]), one])


class NativeRouting:
    """Standard ONNX ops only: any runtime, any TensorRT version."""

    name = "native"

    def visual_score(self, graph: GraphBuilder, score: ScoreSpec, queries: str, keys: str, positions: str,
                     vis_start: str, n_vis: int, text: TextSpec, float_type: int) -> str:
        with graph.scope("VisualScore"):
            vis_end = graph.op("Add", [vis_start, graph.ints([n_vis])])
            first_row = {"last_text": graph.ints([-1]), "text": vis_end, "visual_and_text": vis_start}[score.query_rows]
            query_rows = graph.slice(queries, first_row, graph.ints([MAX]), axes=[2])  # [1, H, R, Dh]
            key_pos = graph.reshape(positions, [-1])  # [T]
            row_pos = graph.slice(key_pos, first_row, graph.ints([MAX]), axes=[0])  # [R]
            # rankings are computed in float32 whatever the graph's dtype, as the reference and the plugin do.
            # 4-D product with K transposed right at the MatMul (fused by ONNX Runtime and TensorRT)
            grouped = graph.reshape(blocks.to_f32(graph, query_rows, float_type),
                                    [1, text.num_kv_heads, -1, text.head_dim])  # [1, Hkv, G*R, Dh]
            keys_t = graph.transpose(blocks.to_f32(graph, keys, float_type), [0, 1, 3, 2])
            logits = graph.op("MatMul", [grouped, keys_t])  # [1, Hkv, G*R, T]
            key_count = graph.slice(graph.op("Shape", [logits]), graph.ints([3]), graph.ints([4]), axes=[0])
            per_head_shape = graph.op("Concat", [graph.ints([text.num_heads, -1]), key_count], axis=0)
            scaled = graph.op("Mul", [logits, graph.scalar(text.head_dim**-0.5, np.float32)])
            logits = graph.op("Reshape", [scaled, per_head_shape])  # [H, R, T]
            future = graph.op("Greater", [graph.unsqueeze(key_pos, [0]), graph.unsqueeze(row_pos, [1])])  # [R, T]
            mask = graph.op("Where", [future, graph.scalar(F32_MIN, np.float32), graph.scalar(0.0, np.float32)])
            probs = graph.op("Softmax", [graph.op("Add", [logits, mask])], axis=-1)  # [H, R, T]
            # reduce heads first, then keep the visual key columns: the copy is [R, n], not [H, R, n]
            reduce_op = "ReduceMax" if score.head_reduction == "max" else "ReduceMean"
            rows = graph.slice(graph.reduce(reduce_op, probs, [0], keepdims=0), vis_start, vis_end, axes=[1])  # [R, n]
            if score.combine == "single":
                return graph.reduce("ReduceMean", rows, [0], keepdims=0)
            # FitPrune: (mass from visual rows / n) x (mass from text rows / #text rows)
            visual_rows = graph.slice(rows, graph.ints([0]), graph.ints([n_vis]), axes=[0])
            self_mass = graph.op("Div", [graph.reduce("ReduceSum", visual_rows, [0], keepdims=0),
                                         graph.scalar(float(n_vis), np.float32)])
            text_rows = graph.slice(rows, graph.ints([n_vis]), graph.ints([MAX]), axes=[0])
            count = graph.cast(graph.slice(graph.op("Shape", [text_rows]), graph.ints([0]), graph.ints([1]), axes=[0]),
                               TensorProto.FLOAT)
            count = graph.op("Max", [count, graph.const(np.ones([1], np.float32), "const.f32.ones1")])
            cross_mass = graph.op("Div", [graph.reduce("ReduceSum", text_rows, [0], keepdims=0), count])
            return graph.op("Mul", [self_mass, cross_mass])

    def token_select(self, graph: GraphBuilder, scores: str, vis_start: str, data: str, positions: str,
                     keep: int, n_vis: int) -> tuple[str, str, str]:
        with graph.scope("TokenSelect"):
            keep_const = graph.ints([keep])
            best = graph.op("TopK", [scores, keep_const], outputs=2, axis=-1, largest=1, sorted=1)[1]  # [k]
            # TensorRT has no Sort: order the kept indices ascending with a second TopK.
            as_float = graph.cast(best, TensorProto.FLOAT)
            ascending = graph.op("TopK", [as_float, keep_const], outputs=2, axis=-1, largest=0, sorted=1)[0]
            kept = graph.op("Add", [graph.cast(ascending, TensorProto.INT64), vis_start])
            vis_end = graph.op("Add", [vis_start, graph.ints([n_vis])])
            length = graph.slice(graph.op("Shape", [data]), graph.ints([1]), graph.ints([2]), axes=[0])
            rows = graph.op("Concat", [_arange(graph, graph.ints([0]), vis_start), kept,
                                       _arange(graph, vis_end, length)], axis=0)
            return graph.op("Gather", [data, rows], axis=1), graph.op("Gather", [positions, rows], axis=1), rows

    def token_select_pair(self, graph: GraphBuilder, scores: str, vis_start: str, first: str, second: str,
                          positions: str, keep: int, n_vis: int, widths: tuple[int, int]) -> tuple[str, str, str, str]:
        # one selection of the second tensor, its kept rows reused for the first
        second, positions, rows = self.token_select(graph, scores, vis_start, second, positions, keep, n_vis)
        return graph.op("Gather", [first, rows], axis=1), second, positions, rows

    def token_scatter(self, graph: GraphBuilder, base: str, updates: str, rows: str,
                      skip_scale: str | None = None) -> str:
        with graph.scope("TokenScatter"):
            if skip_scale is not None:
                base = graph.op("Mul", [base, skip_scale])
            # ScatterElements (reduction none) writes element-wise: the row index repeated along D
            index = graph.op("Expand", [graph.reshape(rows, [1, -1, 1]), graph.op("Shape", [updates])])
            return graph.op("ScatterElements", [base, index, updates], axis=1)

    def scatter_scores(self, graph: GraphBuilder, scores: str, kept: str, fresh: str) -> str:
        with graph.scope("ScatterScores"):
            return graph.op("ScatterElements", [scores, kept, fresh], axis=0)


class PluginRouting:
    """One ``mllm_deploy`` node per step (plugins/ops.py), spelt by plugins/schemas.py's ``make_node``."""

    name = "plugin"

    @staticmethod
    def _node(graph: GraphBuilder, op_type: str, inputs: list[str], outputs: int, **attributes) -> list[str]:
        node_name = graph.node_name(op_type)
        output_names = [f"{node_name}/output_{i}" for i in range(outputs)]  # GraphBuilder.op's naming
        graph.nodes.append(schemas.make_node(op_type, inputs, output_names, name=node_name, **attributes))
        graph.custom_domains[schemas.DOMAIN] = schemas.VERSION
        return output_names

    def visual_score(self, graph: GraphBuilder, score: ScoreSpec, queries: str, keys: str, positions: str,
                     vis_start: str, n_vis: int, text: TextSpec, float_type: int) -> str:
        return self._node(graph, "VisualScore", [queries, keys, positions, vis_start], 1, n_vis=n_vis,
                          query_rows=score.query_rows, head_reduction=score.head_reduction, combine=score.combine,
                          scale=text.head_dim**-0.5)[0]

    def token_select(self, graph: GraphBuilder, scores: str, vis_start: str, data: str, positions: str,
                     keep: int, n_vis: int) -> tuple[str, str, str]:
        data, positions, rows = self._node(graph, "TokenSelect", [scores, vis_start, data, positions], 3,
                                           k=keep, n_vis=n_vis)
        return data, positions, rows

    def token_select_pair(self, graph: GraphBuilder, scores: str, vis_start: str, first: str, second: str,
                          positions: str, keep: int, n_vis: int, widths: tuple[int, int]) -> tuple[str, str, str, str]:
        # the plugin moves one tensor: both travel together
        both = graph.op("Concat", [first, second], axis=-1)
        both, positions, rows = self.token_select(graph, scores, vis_start, both, positions, keep, n_vis)
        first, second = graph.split(both, list(widths), axis=-1)
        return first, second, positions, rows

    def token_scatter(self, graph: GraphBuilder, base: str, updates: str, rows: str,
                      skip_scale: str | None = None) -> str:
        inputs = [base, updates, rows] + ([skip_scale] if skip_scale is not None else [])
        return self._node(graph, "TokenScatter", inputs, 1)[0]

    def scatter_scores(self, graph: GraphBuilder, scores: str, kept: str, fresh: str) -> str:
        def as_rows(vector: str) -> str:  # TokenScatter moves rows of [1, T, D]
            return graph.reshape(vector, [1, -1, 1])

        return graph.reshape(self._node(graph, "TokenScatter", [as_rows(scores), as_rows(fresh), kept], 1)[0], [-1])


ROUTINGS: dict[str, type] = {"native": NativeRouting, "plugin": PluginRouting}
ROUTING_MODES = tuple(ROUTINGS)


def routing_by_name(name: str) -> Routing:
    if name not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTING_MODES}")
    return ROUTINGS[name]()


# ---- steps spelt the same in both routings ------------------------------------------------------------
def drop_visual_span(graph: GraphBuilder, data: str, positions: str, vis_start: str, n_vis: int) -> tuple[str, str]:
    """VTW: every visual token leaves; slicing needs no routing op in either routing."""
    with graph.scope("DropVisual"):
        vis_end = graph.op("Add", [vis_start, graph.ints([n_vis])])

        def without_span(tensor: str) -> str:
            return graph.op("Concat", [graph.slice(tensor, graph.ints([0]), vis_start, axes=[1]),
                                       graph.slice(tensor, vis_end, graph.ints([MAX]), axes=[1])], axis=1)

        return without_span(data), without_span(positions)


def expose_selection(graph: GraphBuilder, layer: int, scores: str, kept: str, n_vis: int, keep: int) -> None:
    """Graph outputs ``route.{layer}.scores`` [n_vis] float32 and ``route.{layer}.kept`` [keep] int64 (visual-span
    indices, ascending): build-mllm --verify compares two backends' selections with them and tells a near-tie
    broken differently from a real mismatch. Both tensors exist anyway; the runtime does not read them."""
    scores_name, kept_name = route_names(layer)
    graph.output(scores, scores_name, TensorProto.FLOAT, [n_vis])
    graph.output(kept, kept_name, TensorProto.INT64, [keep])


def kept_visual(graph: GraphBuilder, rows: str, vis_start: str, keep: int) -> str:
    """Visual-span indices [keep] of the kept visual rows, from TokenSelect's rows."""
    with graph.scope("kept_visual"):
        kept_rows = graph.slice(rows, vis_start, graph.op("Add", [vis_start, graph.ints([keep])]), axes=[0])
        return graph.op("Sub", [kept_rows, vis_start])


def ones_around(graph: GraphBuilder, middle: str, vis_start: str, total: str, float_type: int) -> str:
    """[1, T, 1]: ones before ``vis_start``, ``middle`` [1, m, 1], ones up to ``total`` [1] rows."""
    with graph.scope("ones_around"):
        dtype = blocks.NP_FLOAT[float_type]
        one = graph.const(np.ones([1, 1, 1], dtype), f"const.{np.dtype(dtype).name}.ones111")
        middle_len = graph.slice(graph.op("Shape", [middle]), graph.ints([1]), graph.ints([2]), axes=[0])
        tail = graph.op("Sub", [total, graph.op("Add", [vis_start, middle_len])])

        def rows_shape(count: str) -> str:
            return graph.op("Concat", [graph.ints([1]), count, graph.ints([1])], axis=0)

        return graph.op("Concat", [graph.op("Expand", [one, rows_shape(vis_start)]), middle,
                                   graph.op("Expand", [one, rows_shape(tail)])], axis=1)
