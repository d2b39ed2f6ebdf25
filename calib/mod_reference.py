"""The PyTorch reference of a mixture-of-depths prefill (docs/mod.md), one layer at a time.

Visual tokens are the only routable tokens. At a routed layer ``l`` with capacity ``k``:

1. every visual token gets a router score (``scores``): a linear router over the layer's input
   RMSNorm output or residual stream, or, for the attention router, the text->visual attention
   the previous layer paid it;
2. the ``k`` best are kept in ascending index order (ties to the lower index, as ONNX TopK), their
   rows and original position ids gathered together with every text row;
3. the layer's block runs on that subset only (its KV cache holds exactly those rows); with
   ``selected_scale`` the selected visual rows' MLP output is scaled by ``sigmoid(score)``
   (gamma-MoD) or ``1 + alpha tanh(score)`` (p-MoD);
4. the processed rows are written back; skipped visual rows keep their hidden state
   (``skip = identity``) or are scaled by ``1 + alpha tanh(score)`` (``tanh_scale``, p-MoD).

The attention router keeps a running score per visual token: a dense layer followed by a routed
one sets every score from its text->visual attention; a routed layer followed by a routed one
updates the scores of the tokens it processed and leaves the skipped tokens' scores as they were
(their attention in the last layer that processed them). Decode tokens go through every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm_deploy.calib import scoring
from mllm_deploy.calib.reference_layers import PrefillState
from mllm_deploy.formats.routers import LinearRouter


@dataclass
class ModRun:
    """One prompt's prefill in progress: the full sequence (skipped tokens stay in it)."""

    x: torch.Tensor  # [1, T, d]
    positions: torch.Tensor  # [T]
    vis_start: int
    n_vis: int
    state: PrefillState
    attention_scores: torch.Tensor | None = None  # [n_vis] float32, the attention router's running scores


def tanh_norm(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    return 1.0 + alpha * torch.tanh(scores)


class ModExecutor:
    def __init__(self, reference, recipe, routers: dict[int, LinearRouter] | None):
        """``reference``: the RecipeReference this runs for; its ``stack`` (calib/reference_layers.TextStack)
        does the layer arithmetic."""
        self.stack = reference.stack
        self.layers = self.stack.text.layers
        self.recipe = recipe
        self.mod = recipe.mod
        self.routed = set(recipe.mod_layers)
        self.routers = routers if routers is not None else {}  # fitting adds layers as it goes
        self.alpha = float(self.mod.tanh_alpha or 0.0)

    # ---- pieces ------------------------------------------------------------------------------
    def start(self, input_ids: torch.Tensor, features: torch.Tensor) -> ModRun:
        x, vis_start = self.stack.embed(input_ids, features)
        return ModRun(x, torch.arange(input_ids.shape[1]), vis_start, features.shape[1],
                      PrefillState(prompt_len=input_ids.shape[1]))

    def router_input(self, l: int, run: ModRun) -> torch.Tensor:
        """What layer l's linear router reads for each visual token: [n_vis, d]."""
        vis = run.x[0, run.vis_start:run.vis_start + run.n_vis]
        return self.layers[l].input_layernorm(vis) if self.mod.router_input == "input_norm" else vis

    def scores(self, l: int, run: ModRun) -> torch.Tensor:
        """Router score of every visual token at routed layer l, [n_vis] float32 (larger is processed)."""
        if self.mod.router == "attention":
            return run.attention_scores
        router = self.routers[l]
        u = self.router_input(l, run)
        weight = torch.from_numpy(router.weight).to(u.dtype)
        return (u @ weight).float() + router.bias

    def dense_update_norm(self, l: int, run: ModRun) -> torch.Tensor:
        """||block(x) - x|| / ||x|| of each visual token if layer l processed every token: [n_vis]."""
        layer, stack = self.layers[l], self.stack
        q, k, v = stack.project(layer, layer.input_layernorm(run.x), run.positions)
        y = run.x + layer.self_attn.o_proj(stack.attend(q, k, v, run.positions, run.positions))
        y = y + layer.mlp(layer.post_attention_layernorm(y))
        span = slice(run.vis_start, run.vis_start + run.n_vis)
        return ((y - run.x)[0, span].float().norm(dim=-1) / run.x[0, span].float().norm(dim=-1).clamp_min(1e-12))

    def dense_attention_scores(self, l: int, run: ModRun) -> torch.Tensor:
        """Text->visual attention of layer l if it processed every token: [n_vis] (fitting target)."""
        layer, stack = self.layers[l], self.stack
        q, k, _ = stack.project(layer, layer.input_layernorm(run.x), run.positions)
        return scoring.visual_scores(self.recipe.score, q, stack.repeat(k), run.positions, run.vis_start, run.n_vis)

    def _weights(self, scores: torch.Tensor, rule: str) -> torch.Tensor:
        return torch.sigmoid(scores) if rule == "sigmoid" else tanh_norm(scores, self.alpha)

    # ---- one layer ---------------------------------------------------------------------------
    def step(self, l: int, run: ModRun, observer=None) -> None:
        stack, layer = self.stack, self.layers[l]
        vs, n = run.vis_start, run.n_vis
        routed = l in self.routed
        if routed:
            scores = self.scores(l, run)
            keep = scoring.select_top(scores, self.recipe.visual_tokens[l])
            rows = torch.cat([torch.arange(vs), vs + keep, torch.arange(vs + n, run.x.shape[1])])
            x, positions, n_here = run.x[:, rows], run.positions[rows], len(keep)
        else:
            x, positions, n_here = run.x, run.positions, n
        q, k, v = stack.project(layer, layer.input_layernorm(x), positions)
        run.state.cache.append((k, v))
        run.state.kept.append(positions.clone())
        if observer is not None:
            observer(l, q, stack.repeat(k), positions, vs, n_here)
        if self.mod.router == "attention" and l + 1 in self.routed:
            fresh = scoring.visual_scores(self.recipe.score, q, stack.repeat(k), positions, vs, n_here)
            if routed:
                run.attention_scores = run.attention_scores.clone()
                run.attention_scores[keep] = fresh
            else:
                run.attention_scores = fresh
        y = x + layer.self_attn.o_proj(stack.attend(q, k, v, positions, positions))
        mlp = layer.mlp(layer.post_attention_layernorm(y))
        if routed and self.mod.selected_scale != "none":
            scale = torch.ones(x.shape[1])
            scale[vs:vs + n_here] = self._weights(scores[keep], self.mod.selected_scale)
            mlp = mlp * scale.to(mlp.dtype)[None, :, None]
        y = y + mlp
        if not routed:
            run.x = y
            return
        if self.mod.skip == "tanh_scale":
            scale = torch.ones(run.x.shape[1])
            scale[vs:vs + n] = tanh_norm(scores, self.alpha)
            out = run.x * scale.to(run.x.dtype)[None, :, None]
        else:
            out = run.x.clone()
        out[:, rows] = y
        run.x = out

    # ---- whole prefill -----------------------------------------------------------------------
    def prefill(self, input_ids, features, observer=None, stop_after: int | None = None):
        run = self.start(input_ids, features)
        layers = self.recipe.num_layers if stop_after is None else stop_after
        for l in range(layers):
            self.step(l, run, observer)
        if stop_after is not None:
            return run.x, run.state
        return self.logits(run), run.state

    def logits(self, run: ModRun) -> torch.Tensor:
        return self.stack.last_logits(run.x)
