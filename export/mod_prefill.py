"""The prefill graph of a mixture-of-depths recipe (docs/mod.md; reference: calib/mod_reference.py).

Unlike pruning, the hidden state keeps every token ``[1, T, d]`` from layer to layer. A routed
layer with capacity ``k``:

    scores [N]      router MatMul over the visual span (after the layer's input RMSNorm, or on
                    the residual), or the attention router's running scores
    TokenSelect     top-k visual rows in ascending order + every text row -> subset [1, T-N+k, d],
                    its original position ids and its row indices
    block           RoPE tables and causal mask from the subset's positions; present.{l} holds
                    exactly the subset (T - N + k entries); optional scale of the selected rows'
                    MLP output
    TokenScatter    processed rows written back into the full sequence; skipped rows kept, or
                    scaled by the TanhNorm of their score

Native routing spells these with TopK / Gather / ScatterElements (reduction none); plugin routing
with one ``TokenSelect`` / ``TokenScatter`` (and ``VisualScore`` for the attention router) node
each. The decode graph is the usual one: decode tokens go through every layer and each layer's
past has its own length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mllm_deploy.export import blocks, routing
from mllm_deploy.export.pruned_prefill import PrefillBuilder, Tokens


@dataclass(frozen=True)
class Selection:
    """A routed layer's choice: the scores [N] float32, the subset's global rows and its kept visual indices [k]."""

    scores: str
    rows: str
    kept: str


class ModPrefillBuilder(PrefillBuilder):
    def __init__(self, graph, spec, weights, rope, float_type, recipe, routing_name: str, routers=None):
        super().__init__(graph, spec, weights, rope, float_type, recipe, routing_name)
        self.mod = recipe.mod
        if routers is None and self.mod.router != "attention":
            from mllm_deploy.formats.routers import recipe_routers

            routers = recipe_routers(recipe)
        self.routers = routers or {}
        self.alpha = float(self.mod.tanh_alpha or 0.0)
        self.routed = set(recipe.mod_layers)
        self.running: str | None = None  # the attention router's scores, [N] float32

    def build(self) -> None:
        graph = self.graph
        self._rope_constants()
        with graph.scope("model"):
            tokens = self._embed()  # every token, every layer
            self.length = graph.slice(graph.op("Shape", [tokens.hidden]), graph.ints([1]), graph.ints([2]),
                                      axes=[0])  # [1] = T
            for layer in range(self.text.num_layers):
                with graph.scope(f"layers.{layer}"):
                    subset, selection = self._select(layer, tokens) if layer in self.routed else (tokens, None)
                    q, k, ctx = self._attention(layer, subset)
                    self._rank_running(layer, subset, q, k, selection)
                    mlp_scale = self._selected_scale(subset, selection)
                    processed = self._finish(layer, subset.hidden, ctx, mlp_scale)
                    if selection is not None:
                        processed = self._scatter(tokens.hidden, processed, selection)
                    tokens = replace(tokens, hidden=processed)
            self._logits(tokens.hidden)

    # ---- stages -----------------------------------------------------------------------------------
    def _select(self, layer: int, tokens: Tokens) -> tuple[Tokens, Selection]:
        """The subset a routed layer processes: its top-``capacity`` visual rows and every text row."""
        graph, capacity = self.graph, self.recipe.visual_tokens[layer]
        with graph.scope("route"):
            scores = self.running if self.mod.router == "attention" else self._router_scores(layer, tokens.hidden)
            hidden, positions, rows = self.routing.token_select(graph, scores, self.vis_start, tokens.hidden,
                                                                tokens.positions, capacity, tokens.n_vis)
            kept = self._expose(layer, scores, rows, tokens.n_vis, capacity)
            return self._tokens(hidden, positions, capacity), Selection(scores, rows, kept)

    def _ranks_with(self, layer: int, tokens: Tokens) -> bool:
        """The attention router reads a layer's q and k when the next layer is routed."""
        return self.mod.router == "attention" and layer + 1 in self.routed

    def _rank_running(self, layer: int, subset: Tokens, q: str, k: str, selection: Selection | None) -> None:
        """The attention router: this layer's attention ranks the visual tokens for the next routed layer."""
        if self.mod.router != "attention" or layer + 1 not in self.routed:
            return
        with self.graph.scope("rank"):
            fresh = self._visual_score(q, k, subset)
            if selection is None:
                self.running = fresh
            else:
                self.running = self.routing.scatter_scores(self.graph, self.running, selection.kept, fresh)

    def _selected_scale(self, subset: Tokens, selection: Selection | None) -> str | None:
        """[1, T_l, 1] scale of the selected rows' MLP output (gamma-MoD sigmoid, p-MoD TanhNorm), or None."""
        graph = self.graph
        if selection is None or self.mod.selected_scale == "none":
            return None
        with graph.scope("route"), graph.scope("selected_scale"):
            chosen = self._token_weights(graph.op("Gather", [selection.scores, selection.kept], axis=0),
                                         self.mod.selected_scale)
            subset_length = graph.slice(graph.op("Shape", [subset.hidden]), graph.ints([1]), graph.ints([2]), axes=[0])
            return routing.ones_around(graph, self._as_rows(chosen), self.vis_start, subset_length, self.float_type)

    def _scatter(self, hidden: str, processed: str, selection: Selection) -> str:
        """The processed rows written back into the full sequence."""
        graph = self.graph
        with graph.scope("route"), graph.scope("scatter"):  # "/route/" marks routing in bench-mllm's profile
            skip_scale = None
            if self.mod.skip == "tanh_scale":
                weights = self._as_rows(self._token_weights(selection.scores, "tanh_norm"))
                skip_scale = routing.ones_around(graph, weights, self.vis_start, self.length, self.float_type)
            return self.routing.token_scatter(graph, hidden, processed, selection.rows, skip_scale)

    # ---- helpers ----------------------------------------------------------------------------------
    def _visual_span(self, hidden: str) -> str:
        graph = self.graph
        span_end = graph.op("Add", [self.vis_start, graph.ints([self.spec.visual_tokens])])
        return graph.slice(hidden, self.vis_start, span_end, axes=[1])

    def _router_scores(self, layer: int, hidden: str) -> str:
        """A linear router's score of every visual token, [N] float32."""
        graph, router = self.graph, self.routers[layer]
        with graph.scope("router"):
            visual = self._visual_span(hidden)  # [1, N, d]
            if self.mod.router_input == "input_norm":
                visual = blocks.rms_norm(graph, visual, f"text.layers.{layer}.input_norm.weight", self.weights,
                                         self.text.rms_norm_eps, self.float_type, "input_layernorm")
            weight = np.asarray(router.weight, blocks.NP_FLOAT[self.float_type]).reshape(-1, 1)  # [d, 1]
            logits = graph.op("MatMul", [visual, graph.const(weight, name=f"mod.layers.{layer}.router.weight")])
            bias = graph.const(np.array([router.bias], np.float32), name=f"mod.layers.{layer}.router.bias")
            return graph.reshape(graph.op("Add", [blocks.to_f32(graph, logits, self.float_type), bias]), [-1])

    def _token_weights(self, scores: str, rule: str) -> str:
        """sigmoid(score) (gamma-MoD) or 1 + alpha tanh(score) (p-MoD TanhNorm), float32."""
        graph = self.graph
        if rule == "sigmoid":
            return graph.op("Sigmoid", [scores])
        scaled = graph.op("Mul", [graph.op("Tanh", [scores]), graph.scalar(self.alpha, np.float32)])
        return graph.op("Add", [scaled, graph.scalar(1.0, np.float32)])

    def _as_rows(self, weights: str) -> str:
        """[m] float32 -> [1, m, 1] in the graph's float type."""
        return self.graph.reshape(blocks.from_f32(self.graph, weights, self.float_type), [1, -1, 1])
