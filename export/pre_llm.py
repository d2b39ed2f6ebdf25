"""Visual-token selection before the language model, in the vision graph (recipe ``pre_llm``; docs/pre_llm_and_eas.md).

Both methods end the same way: a score per visual token, then the routing's ``token_select`` with a constant k
(native: TopK, TopK to sort the kept indices ascending, Gather; plugin: the TokenSelect op) over the tower's
visual run, so the vision graph outputs ``image_features`` [1, keep, d] in the tokens' original order and
``pre_llm.kept`` [keep] (their indices among the tower's tokens). DART inside the language model
(:func:`dart_in_llm_scores`) scores the same way at a decoder layer's input (export/pruned_prefill.py).

- ``cls`` (FasterVLM): the attention the [CLS] query pays each patch, heads averaged, in the last vision layer
  the graph runs (the one whose output feeds the projector), float32. Selection happens before the projector:
  the projector is per token, so projecting only the kept tokens gives the same rows for less work.
- ``dart`` at the embedding level: on the projected features, ``pivots`` pivot tokens with the largest L1 norm,
  then each pivot in turn (largest norm first) takes the tokens least similar to it (cosine) among those not yet
  taken, so the kept set is the pivots plus ``keep - pivots`` tokens spread over the pivots (the first
  ``(keep - pivots) % pivots`` pivots take one more). The selected set becomes a 0/1 score vector.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from mllm_deploy.calib.pre_llm_reference import COSINE_EPS, dart_quota  # the reference's budget and epsilon
from mllm_deploy.export import blocks
from mllm_deploy.export.graph import GraphBuilder
from mllm_deploy.formats.recipe_blocks import PreLlmStage

KEPT_OUTPUT = "pre_llm.kept"
F32_LOWEST = float(np.finfo(np.float32).min)


def cls_scores(graph: GraphBuilder, probs: str, float_type: int) -> str:
    """[P] float32: row 0 ([CLS] query) of probs [1, H, P+1, P+1], patch columns, mean over heads."""
    with graph.scope("cls_attention"):
        row = graph.slice(probs, graph.ints([0]), graph.ints([1]), axes=[2])  # [1, H, 1, P+1]
        row = graph.slice(row, graph.ints([1]), graph.ints([blocks.INT64_MAX]), axes=[3])  # [1, H, 1, P]
        mean = graph.reduce_mean(blocks.to_f32(graph, row, float_type), [0, 1, 2], keepdims=0)
        return mean


def _unit_rows(graph: GraphBuilder, x: str) -> str:
    """Rows of x [r, d] float32 divided by their L2 norm (at least COSINE_EPS)."""
    l2 = graph.op("Sqrt", [graph.reduce("ReduceSum", graph.op("Mul", [x, x]), [1], keepdims=1)])  # [r, 1]
    return graph.op("Div", [x, graph.op("Max", [l2, graph.scalar(COSINE_EPS, np.float32)])])


def duplication_scores(graph: GraphBuilder, norms: str, unit: str, n: int, keep: int, pivots: int,
                       text_rows: str | None = None, text_pivots: int = 0) -> str:
    """[n] float32, 1 for the ``keep`` visual tokens DART keeps: the ``pivots`` largest ``norms`` [n], then each pivot
    row (theirs, then ``text_rows`` [text_pivots, d]) takes its quota of the free tokens least cosine-similar to it.
    ``unit``: the visual tokens' unit rows [n, d]."""
    chosen = graph.op("TopK", [norms, graph.ints([pivots])], outputs=2, axis=-1, largest=1, sorted=1)[1]
    rows = graph.op("Gather", [unit, chosen], axis=0)  # [p, d]
    if text_rows is not None:
        rows = graph.op("Concat", [rows, text_rows], axis=0)
    similarity = graph.op("MatMul", [rows, graph.transpose(unit, [1, 0])])  # [p (+ text), n]
    taken = graph.op("ScatterElements", [graph.const(np.zeros([n], np.float32), f"const.f32.zeros{n}"), chosen,
                                         graph.const(np.ones([pivots], np.float32), f"const.f32.ones{pivots}")], axis=0)
    lowest = graph.scalar(F32_LOWEST, np.float32)
    for i, quota in enumerate(dart_quota(keep, pivots, pivots + text_pivots)):
        if quota == 0:
            continue
        with graph.scope(f"pivot{i}"):
            row = graph.reshape(graph.slice(similarity, graph.ints([i]), graph.ints([i + 1]), axes=[0]), [n])
            free = graph.op("Where", [graph.op("Greater", [taken, graph.scalar(0.5, np.float32)]), lowest,
                                      graph.op("Neg", [row])])
            picked = graph.op("TopK", [free, graph.ints([quota])], outputs=2, axis=-1, largest=1, sorted=1)[1]
            taken = graph.op("ScatterElements", [taken, picked,
                                                 graph.const(np.ones([quota], np.float32), f"const.f32.ones{quota}")],
                             axis=0)
    return taken


def dart_scores(graph: GraphBuilder, features: str, n: int, stage: PreLlmStage, float_type: int) -> str:
    """Embedding-level DART on the projected features [1, n, d]: pivots by L1 norm, cosine duplication."""
    with graph.scope("dart"):
        x = graph.reshape(blocks.to_f32(graph, features, float_type), [n, -1])  # [n, d]
        l1 = graph.reduce("ReduceSum", graph.op("Abs", [x]), [1], keepdims=0)  # [n]
        return duplication_scores(graph, l1, _unit_rows(graph, x), n, stage.keep, stage.pivots)


def dart_in_llm_scores(graph: GraphBuilder, keys: str, normed: str, width: int, vis_start: str, n: int, keep: int,
                       pivots: int, text_pivots: int, float_type: int) -> str:
    """DART at a decoder layer's input: pivots by the L1 norm of the previous layer's keys [1, Hkv, T, Dh] among the
    visual tokens and the text after the image; cosine on ``normed`` [1, T, d] (the input after the final norm).
    Fewer text tokens than text pivots: the missing ones are zero rows (calib/pre_llm_reference.py, the same)."""
    with graph.scope("dart"):
        l1 = graph.reshape(graph.reduce("ReduceSum", graph.op("Abs", [blocks.to_f32(graph, keys, float_type)]),
                                        [1, 3], keepdims=0), [-1])  # [T]
        end = graph.op("Add", [vis_start, graph.ints([n])])
        big = graph.ints([blocks.INT64_MAX])
        unit = _unit_rows(graph, graph.reshape(blocks.to_f32(graph, normed, float_type), [-1, width]))
        visual_l1, visual_unit = graph.slice(l1, vis_start, end, axes=[0]), graph.slice(unit, vis_start, end, axes=[0])
        text_rows = None
        if text_pivots:
            text_l1 = graph.op("Concat", [graph.slice(l1, end, big, axes=[0]),
                                          graph.const(np.full([text_pivots], F32_LOWEST, np.float32),
                                                      f"const.f32.lowest{text_pivots}")], axis=0)
            text_unit = graph.op("Concat", [graph.slice(unit, end, big, axes=[0]),
                                            graph.const(np.zeros([text_pivots, width], np.float32),
                                                        f"const.f32.zeros{text_pivots}x{width}")], axis=0)
            best = graph.op("TopK", [text_l1, graph.ints([text_pivots])], outputs=2, axis=-1, largest=1, sorted=1)[1]
            text_rows = graph.op("Gather", [text_unit, best], axis=0)
        return duplication_scores(graph, visual_l1, visual_unit, n, keep, pivots, text_rows, text_pivots)


def select(graph: GraphBuilder, routing, scores: str, features: str, n: int, keep: int) -> str:
    """features [1, n, d] -> [1, keep, d], kept rows in their original order; outputs ``pre_llm.kept``."""
    with graph.scope("pre_llm_select"):
        positions = graph.const(np.arange(n, dtype=np.int64)[None], name=f"pre_llm.positions{n}")
        start = graph.ints([0])
        kept_features, kept, _rows = routing.token_select(graph, scores, start, features, positions, keep, n)
        graph.output(graph.reshape(kept, [keep]), KEPT_OUTPUT, TensorProto.INT64, [keep])
        return kept_features
