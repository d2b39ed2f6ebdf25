"""The prefill graph with a recipe baked in.

The state that flows between decoder layers is (hidden [1, T_l, d], positions [1, T_l],
n_vis): the visual tokens stay one contiguous run starting at ``image_start`` and only their
count changes, a constant per layer, so every TopK has a constant k. Pruned tokens keep their
original position ids; RoPE tables and the causal mask are re-derived from positions after
each selection. Each layer outputs the KV of exactly the tokens it processed.
"""

from __future__ import annotations

from onnx import TensorProto

from mllm_deploy.formats.recipe import Recipe
from mllm_deploy.export import blocks, routing, text_graphs
from mllm_deploy.export.graph import GraphBuilder
from mllm_deploy.formats.geometry import ModelSpec


class PrefillBuilder:
    def __init__(self, g: GraphBuilder, spec: ModelSpec, w: dict, rope, ft: int, recipe: Recipe, mode: str):
        if mode not in routing.ROUTING_MODES:
            raise ValueError(f"routing must be one of {routing.ROUTING_MODES}")
        self.g, self.spec, self.w, self.rope, self.ft, self.recipe, self.mode = g, spec, w, rope, ft, recipe, mode
        t = spec.text
        self.score_args = dict(num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, head_dim=t.head_dim, ft=ft)

    # ---- position-derived tensors ---------------------------------------------------------------
    def _derive(self, positions: str):
        """cos/sin [1, 1, T, Dh] and the [T, T] causal mask for the current token set."""
        g = self.g
        with g.scope("positions"):
            flat = g.reshape(positions, [-1])
            cos, sin = text_graphs.rope_gather(g, self.tables, flat)  # [T, Dh], broadcasts over [1, H, T, Dh]
            return cos, sin, text_graphs.causal_mask(g, flat)

    def _embed(self):
        g, spec = self.g, self.spec
        ids = g.input("input_ids", TensorProto.INT64, [1, "prefill_len"])
        feats = g.input("image_features", self.ft, [1, spec.visual_tokens, spec.text.hidden_size])
        self.vis_start = g.input("image_start", TensorProto.INT64, [1])
        with g.scope("embed"):
            emb = g.op("Gather", [g.const(self.w["text.embed_tokens"], name="text.embed_tokens"), ids], axis=0)
            end = g.op("Add", [self.vis_start, g.ints([spec.visual_tokens])])
            before = g.slice(emb, g.ints([0]), self.vis_start, axes=[1])
            after = g.slice(emb, end, g.ints([blocks.INT64_MAX]), axes=[1])
            x = g.op("Concat", [before, feats, after], axis=1)  # image features replace the placeholders
            length = g.slice(g.op("Shape", [ids]), g.ints([1]), g.ints([2]), axes=[0])
            positions = g.unsqueeze(text_graphs.arange(g, g.squeeze(length, [0])), [0])  # [1, T]
        return x, positions

    def _pdrop_scores(self, l: int, x: str, positions: str, n_vis: int, cos: str, sin: str) -> str:
        """Rank with layer l's own attention over its full input (PyramidDrop): only the keys of
        all tokens and the query of the last token are projected for it."""
        g, t = self.g, self.spec.text
        dh = t.head_dim
        if self.recipe.score.query_rows != "last_text":
            raise ValueError("ranking with the pruning layer's own attention supports query_rows=last_text only")
        fused = g.const(self.w[f"text.layers.{l}.attn.qkv.weight"], name=f"text.layers.{l}.attn.qkv.weight")
        with g.scope("rank_projection"):
            h = blocks.rms_norm(g, x, f"text.layers.{l}.input_norm.weight", self.w, t.rms_norm_eps, self.ft, "input_layernorm")
            w_q = g.slice(fused, g.ints([0]), g.ints([t.num_heads * dh]), axes=[1])
            w_k = g.slice(fused, g.ints([t.num_heads * dh]), g.ints([(t.num_heads + t.num_kv_heads) * dh]), axes=[1])
            h_last = g.slice(h, g.ints([-1]), g.ints([blocks.INT64_MAX]), axes=[1])
            q = g.transpose(g.reshape(g.op("MatMul", [h_last, w_q]), [1, -1, t.num_heads, dh]), [0, 2, 1, 3])
            k = g.transpose(g.reshape(g.op("MatMul", [h, w_k]), [1, -1, t.num_kv_heads, dh]), [0, 2, 1, 3])
            with g.scope("q"):  # the last token's rotation: the last row of the tables
                last = lambda table: g.slice(table, g.ints([-1]), g.ints([blocks.INT64_MAX]), axes=[0])  # noqa: E731
                q = blocks.apply_rope(g, q, last(cos), last(sin), dh)
            with g.scope("k"):
                k = blocks.apply_rope(g, k, cos, sin, dh)
        return routing.visual_score(g, self.mode, self.recipe.score, q, k, positions, self.vis_start, n_vis,
                                    **self.score_args)

    def _random_scores(self, l: int, n_vis: int) -> str:
        """The random-selection baseline: a constant score vector, the same for every image."""
        from mllm_deploy.formats.recipe import random_scores

        return self.g.const(random_scores(self.recipe.score.seed, l, n_vis), name=f"random_scores.{l}")

    def build(self) -> None:
        g, spec, recipe = self.g, self.spec, self.recipe
        t = spec.text
        self.tables = (g.const(self.rope[0], name="rope.cos"), g.const(self.rope[1], name="rope.sin"))
        mlp_visual = recipe.mlp_visual_tokens()
        offset = recipe.score.attention_layer_offset
        with g.scope("model"):
            x, positions = self._embed()
            cos, sin, mask = self._derive(positions)
            n_vis = spec.visual_tokens
            pending = None  # scores prepared by the previous layer (FastV)
            for l in range(t.num_layers):
                want = recipe.visual_tokens[l]
                with g.scope(f"layers.{l}"):
                    if recipe.prune_stage == "layer_input" and want < n_vis:
                        with g.scope("route"):
                            if want == 0:
                                x, positions = routing.drop_visual_span(g, x, positions, self.vis_start, n_vis)
                            else:
                                if recipe.score.combine == "random":
                                    scores = self._random_scores(l, n_vis)
                                elif offset == -1:
                                    scores = pending
                                else:
                                    scores = self._pdrop_scores(l, x, positions, n_vis, cos, sin)
                                x, positions, rows = routing.token_select(g, self.mode, scores, self.vis_start, x,
                                                                          positions, want, n_vis)
                                routing.expose_selection(g, l, scores, routing.kept_visual(g, rows, self.vis_start, want),
                                                         n_vis, want)
                            n_vis = want
                            cos, sin, mask = self._derive(positions)
                    q, k, v, ctx = text_graphs.layer_attention(g, spec, self.w, l, x, cos, sin, mask, self.ft)
                    kv_dims = [1, t.num_kv_heads, f"kv_len_{l}", t.head_dim]
                    g.output(k, f"present.{l}.key", self.ft, kv_dims)
                    g.output(v, f"present.{l}.value", self.ft, kv_dims)
                    next_want = recipe.visual_tokens[l + 1] if l + 1 < t.num_layers else n_vis
                    if (recipe.prune_stage == "layer_input" and offset == -1 and recipe.score.combine != "random"
                            and 0 < next_want < n_vis):
                        with g.scope("rank"):
                            pending = routing.visual_score(g, self.mode, recipe.score, q, k, positions,
                                                           self.vis_start, n_vis, **self.score_args)
                    if recipe.prune_stage == "after_attention" and mlp_visual[l] < n_vis:
                        with g.scope("route"):
                            # FitPrune: rows leave after attention, before o_proj, from both the
                            # attention output and the residual
                            if mlp_visual[l] == 0:
                                scores = None
                            elif recipe.score.combine == "random":
                                scores = self._random_scores(l, n_vis)
                            else:
                                scores = routing.visual_score(g, self.mode, recipe.score, q, k, positions,
                                                              self.vis_start, n_vis, **self.score_args)
                            if mlp_visual[l] == 0:
                                ctx, _ = routing.drop_visual_span(g, ctx, positions, self.vis_start, n_vis)
                                x, positions = routing.drop_visual_span(g, x, positions, self.vis_start, n_vis)
                            elif self.mode == "native":
                                # one selection, its kept rows reused for the attention output
                                x, positions, rows = routing.token_select(g, self.mode, scores, self.vis_start, x,
                                                                          positions, mlp_visual[l], n_vis)
                                ctx = g.op("Gather", [ctx, rows], axis=1)
                            else:
                                # the plugin moves one tensor: ctx and the residual travel together
                                width = t.num_heads * t.head_dim
                                both = g.op("Concat", [ctx, x], axis=-1)
                                both, positions, rows = routing.token_select(g, self.mode, scores, self.vis_start, both,
                                                                             positions, mlp_visual[l], n_vis)
                                ctx, x = g.split(both, [width, t.hidden_size], axis=-1)
                            if scores is not None:
                                kept = routing.kept_visual(g, rows, self.vis_start, mlp_visual[l])
                                routing.expose_selection(g, l, scores, kept, n_vis, mlp_visual[l])
                            n_vis = mlp_visual[l]
                            cos, sin, mask = self._derive(positions)
                    x = text_graphs.layer_finish(g, spec, self.w, l, x, ctx, self.ft)
            last = g.slice(x, g.ints([-1]), g.ints([blocks.INT64_MAX]), axes=[1])
            g.output(text_graphs.lm_head(g, spec, self.w, last, self.ft), "logits", TensorProto.FLOAT, [1, t.vocab_size])
