"""The prefill graph with a pruning recipe baked in (dense, FastV, PyramidDrop, VTW, FitPrune).

The state that flows between decoder layers is a :class:`Tokens` (hidden [1, T_l, d], positions
[1, T_l], n_vis): the visual tokens stay one contiguous run starting at ``image_start`` and only
their count changes, a constant per layer, so every TopK has a constant k. Pruned tokens keep
their original position ids; RoPE tables and the causal mask are re-derived from positions after
each selection. Each layer outputs the KV of exactly the tokens it processed.

:meth:`PrefillBuilder.build` is one pass per stage: embed; per layer route at the input,
attention, rank (for the next layer), route after attention, finish (o_proj and MLP); logits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from onnx import TensorProto

from mllm_deploy.export import blocks, routing, text_graphs
from mllm_deploy.export.graph import GraphBuilder
from mllm_deploy.formats.geometry import ModelSpec
from mllm_deploy.formats.manifest import present_name
from mllm_deploy.formats.recipe import Recipe


@dataclass(frozen=True)
class Tokens:
    """The token set a layer processes: hidden [1, T_l, d], positions [1, T_l] (original ids), its count of
    visual tokens, whether it is the whole prompt in order (positions 0..T-1), and what the portable attention
    derives from the positions: cos/sin [T_l, Dh] and the causal mask [T_l, T_l] (None until a layer needs them:
    the onnxruntime target's fused attention does not)."""

    hidden: str
    positions: str
    n_vis: int
    contiguous: bool = False
    cos: str | None = None
    sin: str | None = None
    mask: str | None = None


class PrefillBuilder:
    def __init__(self, graph: GraphBuilder, spec: ModelSpec, weights: dict, rope, float_type: int, recipe: Recipe,
                 routing_name: str):
        self.routing = routing.routing_by_name(routing_name)
        self.graph, self.spec, self.text, self.weights = graph, spec, spec.text, weights
        self.rope, self.float_type, self.recipe = rope, float_type, recipe
        self.pending: str | None = None  # scores prepared by the previous layer (FastV)
        self.fused = graph.target == "onnxruntime"  # ONNX Runtime's fused attention where no ranking reads q, k

    def build(self) -> None:
        graph = self.graph
        self._rope_constants()
        with graph.scope("model"):
            tokens = self._embed()
            skipped = set(self.recipe.skip_attention)
            for layer in range(self.text.num_layers):
                if layer in skipped:  # EAS: no attention, no KV; the recipe prunes nothing around it
                    with graph.scope(f"layers.{layer}"):
                        tokens = replace(tokens, hidden=text_graphs.layer_mlp_only(
                            graph, self.spec, self.weights, layer, tokens.hidden, self.float_type))
                    continue
                with graph.scope(f"layers.{layer}"):
                    tokens = self._route_at_input(layer, tokens)
                    q, k, ctx = self._attention(layer, tokens)
                    self._rank(layer, tokens, q, k)
                    tokens, ctx = self._route_after_attention(layer, tokens, q, k, ctx)
                    tokens = replace(tokens, hidden=self._finish(layer, tokens.hidden, ctx))
            self._logits(tokens.hidden)

    # ---- stages -----------------------------------------------------------------------------------
    def _embed(self) -> Tokens:
        graph, spec = self.graph, self.spec
        ids = graph.input("input_ids", TensorProto.INT64, [1, "prefill_len"])
        # LLaVA-NeXT: the visual run's length follows the image (its bucket and unpadding): a symbolic dimension
        visual = "visual_len" if spec.is_anyres else spec.visual_tokens
        features = graph.input("image_features", self.float_type, [1, visual, self.text.hidden_size])
        self.vis_start = graph.input("image_start", TensorProto.INT64, [1])
        with graph.scope("embed"):
            table = graph.const(self.weights["text.embed_tokens"], name="text.embed_tokens")
            embedded = graph.op("Gather", [table, ids], axis=0)
            count = (graph.slice(graph.op("Shape", [features]), graph.ints([1]), graph.ints([2]), axes=[0])
                     if spec.is_anyres else graph.ints([spec.visual_tokens]))
            end = graph.op("Add", [self.vis_start, count])
            before = graph.slice(embedded, graph.ints([0]), self.vis_start, axes=[1])
            after = graph.slice(embedded, end, graph.ints([blocks.INT64_MAX]), axes=[1])
            hidden = graph.op("Concat", [before, features, after], axis=1)  # image features replace the placeholders
            length = graph.slice(graph.op("Shape", [ids]), graph.ints([1]), graph.ints([2]), axes=[0])
            positions = graph.unsqueeze(text_graphs.arange(graph, graph.squeeze(length, [0])), [0])  # [1, T]
        return self._tokens(hidden, positions, spec.visual_tokens, contiguous=True)

    def _route_at_input(self, layer: int, tokens: Tokens) -> Tokens:
        """FastV, PyramidDrop, VTW: visual rows leave before the layer's attention."""
        graph, recipe = self.graph, self.recipe
        keep = recipe.visual_tokens[layer]
        if recipe.prune_stage != "layer_input" or keep >= tokens.n_vis:
            return tokens
        with graph.scope("route"):
            if keep == 0:
                hidden, positions = routing.drop_visual_span(graph, tokens.hidden, tokens.positions, self.vis_start,
                                                             tokens.n_vis)
            else:
                scores = self._input_scores(layer, tokens)
                hidden, positions, rows = self.routing.token_select(graph, scores, self.vis_start, tokens.hidden,
                                                                    tokens.positions, keep, tokens.n_vis)
                self._expose(layer, scores, rows, tokens.n_vis, keep)
            return self._tokens(hidden, positions, keep)

    def _attention(self, layer: int, tokens: Tokens) -> tuple[str | None, str | None, str]:
        """The layer's input norm and attention; outputs its KV. Returns (q, k, ctx); q and k are None where the
        onnxruntime target's fused attention ran (no ranking of this layer reads them)."""
        if self.fused and not self._ranks_with(layer, tokens):
            from mllm_deploy.export import ort_fused

            graph = self.graph
            hidden = blocks.rms_norm(graph, tokens.hidden, f"text.layers.{layer}.input_norm.weight", self.weights,
                                     self.text.rms_norm_eps, self.float_type, "input_layernorm")
            with graph.scope("attn"):
                ctx, k, v = ort_fused.prefill_attention(graph, self.spec, self.weights, layer, hidden,
                                                        tokens.positions, tokens.contiguous, self.caches,
                                                        self.float_type)
            q = k_out = None
        else:
            tokens = self._tables(tokens)
            q, k, v, ctx = text_graphs.layer_attention(self.graph, self.spec, self.weights, layer, tokens.hidden,
                                                       tokens.cos, tokens.sin, tokens.mask, self.float_type)
            k_out = k
        kv_dims = [1, self.text.num_kv_heads, f"kv_len_{layer}", self.text.head_dim]
        self.graph.output(k, present_name(layer, "key"), self.float_type, kv_dims)
        self.graph.output(v, present_name(layer, "value"), self.float_type, kv_dims)
        return q, k_out, ctx

    def _ranks_with(self, layer: int, tokens: Tokens) -> bool:
        """Whether a ranking reads this layer's q and k: FastV's for the next layer, FitPrune's for this one."""
        return self._ranks_next(layer, tokens) or self._ranks_after_attention(layer, tokens)

    def _ranks_next(self, layer: int, tokens: Tokens) -> bool:
        recipe = self.recipe
        next_keep = recipe.visual_tokens[layer + 1] if layer + 1 < self.text.num_layers else tokens.n_vis
        return (recipe.prune_stage == "layer_input" and recipe.score.attention_layer_offset == -1
                and recipe.score.combine != "random" and 0 < next_keep < tokens.n_vis)

    def _ranks_after_attention(self, layer: int, tokens: Tokens) -> bool:
        keep = self.recipe.mlp_visual_tokens()[layer]
        return (self.recipe.prune_stage == "after_attention" and 0 < keep < tokens.n_vis
                and self.recipe.score.combine != "random")

    def _rank(self, layer: int, tokens: Tokens, q: str, k: str) -> None:
        """FastV ranks with the previous layer's attention: the scores the next layer's selection uses."""
        if self._ranks_next(layer, tokens):
            with self.graph.scope("rank"):  # DART ranks by this layer's keys at the next layer's input
                self.pending = k if self.recipe.score.combine == "duplication" else self._visual_score(q, k, tokens)

    def _route_after_attention(self, layer: int, tokens: Tokens, q: str, k: str, ctx: str) -> tuple[Tokens, str]:
        """FitPrune: rows leave after attention, before o_proj, from both the attention output and the residual."""
        graph = self.graph
        keep = self.recipe.mlp_visual_tokens()[layer]
        if self.recipe.prune_stage != "after_attention" or keep >= tokens.n_vis:
            return tokens, ctx
        with graph.scope("route"):
            if keep == 0:
                ctx, _ = routing.drop_visual_span(graph, ctx, tokens.positions, self.vis_start, tokens.n_vis)
                hidden, positions = routing.drop_visual_span(graph, tokens.hidden, tokens.positions, self.vis_start,
                                                             tokens.n_vis)
            else:
                if self.recipe.score.combine == "random":
                    scores = self._random_scores(layer, tokens.n_vis)
                else:
                    scores = self._visual_score(q, k, tokens)
                widths = (self.text.num_heads * self.text.head_dim, self.text.hidden_size)
                ctx, hidden, positions, rows = self.routing.token_select_pair(
                    graph, scores, self.vis_start, ctx, tokens.hidden, tokens.positions, keep, tokens.n_vis, widths)
                self._expose(layer, scores, rows, tokens.n_vis, keep)
            return self._tokens(hidden, positions, keep), ctx

    def _finish(self, layer: int, hidden: str, ctx: str, mlp_scale: str | None = None) -> str:
        return text_graphs.layer_finish(self.graph, self.spec, self.weights, layer, hidden, ctx, self.float_type,
                                        mlp_scale=mlp_scale)

    def _logits(self, hidden: str) -> None:
        graph = self.graph
        last = graph.slice(hidden, graph.ints([-1]), graph.ints([blocks.INT64_MAX]), axes=[1])
        logits = text_graphs.lm_head(graph, self.spec, self.weights, last, self.float_type)
        graph.output(logits, "logits", TensorProto.FLOAT, [1, self.text.vocab_size])

    # ---- helpers ----------------------------------------------------------------------------------
    def _rope_constants(self) -> None:
        from mllm_deploy.export import ort_fused

        graph = self.graph
        self.tables = (graph.const(self.rope[0], name="rope.cos"), graph.const(self.rope[1], name="rope.sin"))
        self.caches = ort_fused.rope_caches(graph, self.rope) if self.fused else None

    def _tokens(self, hidden: str, positions: str, n_vis: int, contiguous: bool = False) -> Tokens:
        """The token set; with cos/sin and the causal mask derived from its positions in the portable target."""
        tokens = Tokens(hidden, positions, n_vis, contiguous)
        return tokens if self.fused else self._tables(tokens)

    def _tables(self, tokens: Tokens) -> Tokens:
        """``tokens`` with the cos/sin tables and causal mask of its positions."""
        if tokens.cos is not None:
            return tokens
        graph = self.graph
        with graph.scope("positions"):
            flat = graph.reshape(tokens.positions, [-1])
            cos, sin = text_graphs.rope_gather(graph, self.tables, flat)  # [T, Dh], broadcasts over [1, H, T, Dh]
            return replace(tokens, cos=cos, sin=sin, mask=text_graphs.causal_mask(graph, flat))

    def _visual_score(self, q: str, k: str, tokens: Tokens) -> str:
        return self.routing.visual_score(self.graph, self.recipe.score, q, k, tokens.positions, self.vis_start,
                                         tokens.n_vis, self.text, self.float_type)

    def _expose(self, layer: int, scores: str, rows: str, n_vis: int, keep: int) -> str:
        """The selection's scores and kept visual indices as graph outputs; returns the kept indices [keep]."""
        kept = routing.kept_visual(self.graph, rows, self.vis_start, keep)
        routing.expose_selection(self.graph, layer, scores, kept, n_vis, keep)
        return kept

    def _input_scores(self, layer: int, tokens: Tokens) -> str:
        if self.recipe.score.combine == "random":
            return self._random_scores(layer, tokens.n_vis)
        if self.recipe.score.combine == "duplication":
            from mllm_deploy.export.pre_llm import dart_in_llm_scores

            score, text = self.recipe.score, self.text
            normed = blocks.rms_norm(self.graph, tokens.hidden, "text.norm.weight", self.weights, text.rms_norm_eps,
                                     self.float_type, "dart_norm")
            return dart_in_llm_scores(self.graph, self.pending, normed, text.hidden_size, self.vis_start, tokens.n_vis,
                                      self.recipe.visual_tokens[layer], score.pivots, score.text_pivots,
                                      self.float_type)
        if self.recipe.score.attention_layer_offset == -1:
            return self.pending
        return self._pdrop_scores(layer, tokens)

    def _pdrop_scores(self, layer: int, tokens: Tokens) -> str:
        """Rank with the layer's own attention over its full input (PyramidDrop): only the keys of
        all tokens and the query of the last token are projected for it."""
        graph, text = self.graph, self.text
        head_dim = text.head_dim
        tokens = self._tables(tokens)
        if self.recipe.score.query_rows != "last_text":
            raise ValueError("ranking with the pruning layer's own attention supports query_rows=last_text only")
        with graph.scope("rank_projection"):
            fused = blocks.weight_matrix(graph, self.weights, f"text.layers.{layer}.attn.qkv")  # as the layer has it
            hidden = blocks.rms_norm(graph, tokens.hidden, f"text.layers.{layer}.input_norm.weight", self.weights,
                                     text.rms_norm_eps, self.float_type, "input_layernorm")
            q_columns = text.num_heads * head_dim
            weight_q = graph.slice(fused, graph.ints([0]), graph.ints([q_columns]), axes=[1])
            weight_k = graph.slice(fused, graph.ints([q_columns]),
                                   graph.ints([(text.num_heads + text.num_kv_heads) * head_dim]), axes=[1])
            hidden_last = graph.slice(hidden, graph.ints([-1]), graph.ints([blocks.INT64_MAX]), axes=[1])
            q = graph.transpose(graph.reshape(graph.op("MatMul", [hidden_last, weight_q]),
                                              [1, -1, text.num_heads, head_dim]), [0, 2, 1, 3])
            k = graph.transpose(graph.reshape(graph.op("MatMul", [hidden, weight_k]),
                                              [1, -1, text.num_kv_heads, head_dim]), [0, 2, 1, 3])
            with graph.scope("q"):  # the last token's rotation: the last row of the tables
                def last_row(table: str) -> str:
                    return graph.slice(table, graph.ints([-1]), graph.ints([blocks.INT64_MAX]), axes=[0])

                q = blocks.apply_rope(graph, q, last_row(tokens.cos), last_row(tokens.sin), head_dim)
            with graph.scope("k"):
                k = blocks.apply_rope(graph, k, tokens.cos, tokens.sin, head_dim)
        return self._visual_score(q, k, tokens)

    def _random_scores(self, layer: int, n_vis: int) -> str:
        """The random-selection baseline: a constant score vector, the same for every image."""
        from mllm_deploy.formats.recipe import random_scores

        return self.graph.const(random_scores(self.recipe.score.seed, layer, n_vis), name=f"random_scores.{layer}")
