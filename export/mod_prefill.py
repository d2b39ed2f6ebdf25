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

import numpy as np
from onnx import TensorProto

from mllm_deploy.export import blocks, routing, text_graphs
from mllm_deploy.export.pruned_prefill import PrefillBuilder


class ModPrefillBuilder(PrefillBuilder):
    def __init__(self, g, spec, w, rope, ft, recipe, mode: str, routers=None):
        super().__init__(g, spec, w, rope, ft, recipe, mode)
        self.mod = recipe.mod
        if routers is None and self.mod["router"] != "attention":
            from mllm_deploy.formats.routers import recipe_routers

            routers = recipe_routers(recipe)
        self.routers = routers or {}
        self.alpha = float(self.mod.get("tanh_alpha") or 0.0)

    def _visual_span(self, x: str) -> str:
        g = self.g
        return g.slice(x, self.vis_start, g.op("Add", [self.vis_start, g.ints([self.spec.visual_tokens])]), axes=[1])

    def _router_scores(self, l: int, x: str) -> str:
        """A linear router's score of every visual token, [N] float32."""
        g, t = self.g, self.spec.text
        router = self.routers[l]
        with g.scope("router"):
            u = self._visual_span(x)  # [1, N, d]
            if self.mod["router_input"] == "input_norm":
                u = blocks.rms_norm(g, u, f"text.layers.{l}.input_norm.weight", self.w, t.rms_norm_eps, self.ft,
                                    "input_layernorm")
            weight = np.asarray(router.weight, blocks.NP_FLOAT[self.ft]).reshape(-1, 1)  # [d, 1]
            logits = g.op("MatMul", [u, g.const(weight, name=f"mod.layers.{l}.router.weight")])  # [1, N, 1]
            bias = g.const(np.array([router.bias], np.float32), name=f"mod.layers.{l}.router.bias")
            return g.reshape(g.op("Add", [blocks.to_f32(g, logits, self.ft), bias]), [-1])

    def _token_weights(self, scores: str, rule: str) -> str:
        """sigmoid(score) (gamma-MoD) or 1 + alpha tanh(score) (p-MoD TanhNorm), float32."""
        g = self.g
        if rule == "sigmoid":
            return g.op("Sigmoid", [scores])
        scaled = g.op("Mul", [g.op("Tanh", [scores]), g.scalar(self.alpha, np.float32)])
        return g.op("Add", [scaled, g.scalar(1.0, np.float32)])

    def _as_rows(self, weights: str) -> str:
        """[m] float32 -> [1, m, 1] in the graph's float type."""
        return self.g.reshape(blocks.from_f32(self.g, weights, self.ft), [1, -1, 1])

    def build(self) -> None:
        g, spec, recipe, mod = self.g, self.spec, self.recipe, self.mod
        t = spec.text
        n = spec.visual_tokens
        routed = set(recipe.mod_layers)
        attention_router = mod["router"] == "attention"
        self.tables = (g.const(self.rope[0], name="rope.cos"), g.const(self.rope[1], name="rope.sin"))
        with g.scope("model"):
            x, positions = self._embed()
            full = self._derive(positions)
            length = g.slice(g.op("Shape", [x]), g.ints([1]), g.ints([2]), axes=[0])  # [1] = T
            running = None  # the attention router's scores, [N] float32
            for l in range(t.num_layers):
                with g.scope(f"layers.{l}"):
                    if l in routed:
                        capacity = recipe.visual_tokens[l]
                        with g.scope("route"):
                            scores = running if attention_router else self._router_scores(l, x)
                            sub, sub_positions, rows = routing.token_select(g, self.mode, scores, self.vis_start, x,
                                                                            positions, capacity, n)
                            kept = routing.kept_visual(g, rows, self.vis_start, capacity)
                            routing.expose_selection(g, l, scores, kept, n, capacity)
                            cos, sin, mask = self._derive(sub_positions)
                        n_here = capacity
                    else:
                        sub, sub_positions, (cos, sin, mask), n_here = x, positions, full, n
                    q, k, v, ctx = text_graphs.layer_attention(g, spec, self.w, l, sub, cos, sin, mask, self.ft)
                    kv_dims = [1, t.num_kv_heads, f"kv_len_{l}", t.head_dim]
                    g.output(k, f"present.{l}.key", self.ft, kv_dims)
                    g.output(v, f"present.{l}.value", self.ft, kv_dims)
                    if attention_router and l + 1 in routed:
                        with g.scope("rank"):
                            fresh = routing.visual_score(g, self.mode, recipe.score, q, k, sub_positions,
                                                         self.vis_start, n_here, **self.score_args)
                            running = routing.scatter_scores(g, self.mode, running, kept, fresh) if l in routed else fresh
                    mlp_scale = None
                    if l in routed and mod["selected_scale"] != "none":
                        with g.scope("route"), g.scope("selected_scale"):
                            chosen = self._token_weights(g.op("Gather", [scores, kept], axis=0), mod["selected_scale"])
                            sub_length = g.slice(g.op("Shape", [sub]), g.ints([1]), g.ints([2]), axes=[0])
                            mlp_scale = routing.ones_around(g, self._as_rows(chosen), self.vis_start, sub_length, self.ft)
                    y = text_graphs.layer_finish(g, spec, self.w, l, sub, ctx, self.ft, mlp_scale=mlp_scale)
                    if l not in routed:
                        x = y
                        continue
                    with g.scope("route"), g.scope("scatter"):  # "/route/" marks routing in bench-mllm's profile
                        skip_scale = None
                        if mod["skip"] == "tanh_scale":
                            skip_scale = routing.ones_around(g, self._as_rows(self._token_weights(scores, "tanh_norm")),
                                                             self.vis_start, length, self.ft)
                        x = routing.token_scatter(g, self.mode, x, y, rows, skip_scale)
            last = g.slice(x, g.ints([-1]), g.ints([blocks.INT64_MAX]), axes=[1])
            g.output(text_graphs.lm_head(g, spec, self.w, last, self.ft), "logits", TensorProto.FLOAT, [1, t.vocab_size])
