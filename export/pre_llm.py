"""Visual-token selection before the language model, in the vision graph (recipe ``pre_llm``; docs/pre_llm_and_eas.md).

Both methods end the same way: a score per visual token, then the routing's ``token_select`` with a constant k
(native: TopK, TopK to sort the kept indices ascending, Gather; plugin: the TokenSelect op) over the tower's
visual run, so the vision graph outputs ``image_features`` [1, keep, d] in the tokens' original order and
``pre_llm.kept`` [keep] (their indices among the tower's tokens).

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

from mllm_deploy.export import blocks
from mllm_deploy.export.graph import GraphBuilder
from mllm_deploy.formats.recipe_blocks import PreLlmStage

KEPT_OUTPUT = "pre_llm.kept"
F32_LOWEST = float(np.finfo(np.float32).min)
COSINE_EPS = 1e-8


def dart_quota(keep: int, pivots: int) -> list[int]:
    """Tokens each pivot adds, in pivot order (largest norm first): keep - pivots in all."""
    base, extra = divmod(keep - pivots, pivots)
    return [base + (1 if i < extra else 0) for i in range(pivots)]


def cls_scores(graph: GraphBuilder, probs: str, float_type: int) -> str:
    """[P] float32: row 0 ([CLS] query) of probs [1, H, P+1, P+1], patch columns, mean over heads."""
    with graph.scope("cls_attention"):
        row = graph.slice(probs, graph.ints([0]), graph.ints([1]), axes=[2])  # [1, H, 1, P+1]
        row = graph.slice(row, graph.ints([1]), graph.ints([blocks.INT64_MAX]), axes=[3])  # [1, H, 1, P]
        mean = graph.reduce_mean(blocks.to_f32(graph, row, float_type), [0, 1, 2], keepdims=0)
        return mean


def dart_scores(graph: GraphBuilder, features: str, n: int, stage: PreLlmStage, float_type: int) -> str:
    """[n] float32, 1 for the tokens DART keeps and 0 for the others, from features [1, n, d]."""
    with graph.scope("dart"):
        x = graph.reshape(blocks.to_f32(graph, features, float_type), [n, -1])  # [n, d]
        l1 = graph.reduce("ReduceSum", graph.op("Abs", [x]), [1], keepdims=0)  # [n]
        pivots = graph.op("TopK", [l1, graph.ints([stage.pivots])], outputs=2, axis=-1, largest=1, sorted=1)[1]
        l2 = graph.op("Sqrt", [graph.reduce("ReduceSum", graph.op("Mul", [x, x]), [1], keepdims=1)])  # [n, 1]
        unit = graph.op("Div", [x, graph.op("Max", [l2, graph.scalar(COSINE_EPS, np.float32)])])
        pivot_rows = graph.op("Gather", [unit, pivots], axis=0)  # [p, d]
        similarity = graph.op("MatMul", [pivot_rows, graph.transpose(unit, [1, 0])])  # [p, n]
        taken = graph.op("ScatterElements", [graph.const(np.zeros([n], np.float32), f"const.f32.zeros{n}"), pivots,
                                             graph.const(np.ones([stage.pivots], np.float32),
                                                         f"const.f32.ones{stage.pivots}")], axis=0)
        lowest = graph.scalar(F32_LOWEST, np.float32)
        for i, quota in enumerate(dart_quota(stage.keep, stage.pivots)):
            if quota == 0:
                continue
            with graph.scope(f"pivot{i}"):
                row = graph.reshape(graph.slice(similarity, graph.ints([i]), graph.ints([i + 1]), axes=[0]), [n])
                free = graph.op("Where", [graph.op("Greater", [taken, graph.scalar(0.5, np.float32)]), lowest,
                                          graph.op("Neg", [row])])
                chosen = graph.op("TopK", [free, graph.ints([quota])], outputs=2, axis=-1, largest=1, sorted=1)[1]
                taken = graph.op("ScatterElements", [taken, chosen,
                                                     graph.const(np.ones([quota], np.float32),
                                                                 f"const.f32.ones{quota}")], axis=0)
        return taken


def select(graph: GraphBuilder, routing, scores: str, features: str, n: int, keep: int) -> str:
    """features [1, n, d] -> [1, keep, d], kept rows in their original order; outputs ``pre_llm.kept``."""
    with graph.scope("pre_llm_select"):
        positions = graph.const(np.arange(n, dtype=np.int64)[None], name=f"pre_llm.positions{n}")
        start = graph.ints([0])
        kept_features, kept, _rows = routing.token_select(graph, scores, start, features, positions, keep, n)
        graph.output(graph.reshape(kept, [keep]), KEPT_OUTPUT, TensorProto.INT64, [keep])
        return kept_features
