"""The PyTorch reference of a recipe: the Hugging Face model's own modules run layer by layer
with the recipe applied (pruning at the recipe's layers with its scoring, original position
ids kept, per-layer KV caches of different lengths, greedy decoding with cache).

This is the ground truth the pruned ONNX export is verified against and what calibration
uses to evaluate a candidate. With a ``dense`` recipe it generates exactly what
``LlavaForConditionalGeneration.generate`` does. Mixture-of-depths recipes run through
``calib/mod_reference.py`` (skipped tokens stay in the sequence); decode is the same for all.
"""

from __future__ import annotations

from typing import Callable

import torch

from mllm_deploy.calib import scoring
from mllm_deploy.calib.mod_reference import ModExecutor
from mllm_deploy.calib.reference_layers import PrefillState, TextStack, select_rows
from mllm_deploy.formats.recipe import Recipe, random_scores

__all__ = ["Observer", "PrefillState", "RecipeReference"]

# observer(layer, q, k, positions, vis_start, n_vis): sees each layer's post-RoPE q and
# GQA-repeated k over the tokens the layer processes (calibration statistics hook).
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int, int], None]


class RecipeReference:
    def __init__(self, model, recipe: Recipe, routers: dict | None = None, pre_llm=None):
        """``routers``: MoD linear routers by layer (formats/routers.LinearRouter); by default a MoD
        recipe's own (its in-memory tensors or its router file). ``pre_llm``: a PreLlmStage applied before the
        language model when ``recipe`` (the in-LLM part, calibrated under it) has none of its own."""
        self.model = model.eval()
        self.full_recipe = recipe
        self.pre_llm = recipe.pre_llm if recipe.pre_llm is not None else pre_llm
        recipe = recipe.llm_recipe()  # the layers below see the visual tokens the language model gets
        self.recipe = recipe
        self.stack = TextStack(self.model)
        self.text = self.stack.text
        self.skipped = set(recipe.skip_attention)  # EAS: layers run their MLP only and cache nothing
        self.mlps = {l: layer.mlp for l, layer in enumerate(self.text.layers)}
        if recipe.pia:
            self.mlps.update(folded_mlps(self.text, recipe))
        self._mod_executor = None
        if recipe.is_mod:
            from mllm_deploy.formats.routers import recipe_routers

            if routers is None and recipe.mod.router != "attention":
                routers = recipe_routers(recipe)
            self._mod_executor = ModExecutor(self, recipe, routers)

    # ---- pieces ------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[1, N, d], or the pre_llm stage's [1, keep, d] (calib/pre_llm.py)."""
        features = self.stack.image_features(pixel_values)
        if self.pre_llm is None:
            return features
        from mllm_deploy.calib.pre_llm_reference import select_features

        return select_features(self.model, self.pre_llm, pixel_values, features)[0]

    def language_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt as the language model sees it: the image run cut to the pre_llm stage's ``keep``."""
        if self.pre_llm is None:
            return input_ids
        from mllm_deploy.calib.pre_llm_reference import shrink_image_run

        return shrink_image_run(input_ids, self.stack.image_token_id, self.pre_llm.keep)

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.stack.embed(input_ids, features)

    # ---- prefill ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, features: torch.Tensor, observer: Observer | None = None,
                stop_after: int | None = None):
        """Returns (last-position logits [1, V], PrefillState). ``stop_after``: run only that many layers
        and return the hidden states instead of logits (calibration shortcuts)."""
        if self._mod_executor is not None:
            return self._mod_executor.prefill(input_ids, features, observer, stop_after)
        recipe, stack = self.recipe, self.stack
        x, vis_start = stack.embed(input_ids, features)
        n_vis = features.shape[1]
        positions = torch.arange(input_ids.shape[1])
        state = PrefillState(prompt_len=input_ids.shape[1])
        pending_scores: torch.Tensor | None = None  # FastV: ranked with the previous layer's attention
        mlp_tokens = recipe.mlp_visual_tokens()
        layers = self.text.layers if stop_after is None else self.text.layers[:stop_after]
        for l, layer in enumerate(layers):
            if l in self.skipped:  # no attention: nothing cached (recipes with skips prune nothing in the LLM)
                state.cache.append(None)
                state.kept.append(None)
                x = x + self.mlps[l](layer.post_attention_layernorm(x))
                continue
            want = recipe.visual_tokens[l]
            if recipe.prune_stage == "layer_input" and want < n_vis:
                if want == 0:
                    keep_vis = torch.zeros(0, dtype=torch.long)
                else:
                    if recipe.score.combine == "random":
                        scores = torch.from_numpy(random_scores(recipe.score.seed, l, n_vis)).to(x.device)
                    elif recipe.score.combine == "duplication":  # DART: previous layer's keys, this input's states
                        from mllm_deploy.calib.pre_llm_reference import dart_in_llm_keep

                        kept = dart_in_llm_keep(pending_scores, self.text.norm(x), vis_start, n_vis, want,
                                                recipe.score.pivots, recipe.score.text_pivots)
                        scores = torch.zeros(n_vis)
                        scores[kept] = 1.0
                    elif recipe.score.attention_layer_offset == -1:
                        scores = pending_scores
                    else:
                        q, k, _ = stack.project(layer, layer.input_layernorm(x), positions)
                        scores = scoring.visual_scores(recipe.score, q, stack.repeat(k), positions, vis_start, n_vis)
                    keep_vis = scoring.select_top(scores, want)
                x, positions = select_rows(x, positions, vis_start, n_vis, keep_vis)
                n_vis = want
            h = layer.input_layernorm(x)
            q, k, v = stack.project(layer, h, positions)
            state.cache.append((k, v))
            state.kept.append(positions.clone())
            if observer is not None:
                observer(l, q, stack.repeat(k), positions, vis_start, n_vis)
            next_want = recipe.visual_tokens[l + 1] if l + 1 < recipe.num_layers else n_vis
            if (recipe.prune_stage == "layer_input" and recipe.score.attention_layer_offset == -1
                    and recipe.score.combine != "random" and 0 < next_want < n_vis):
                pending_scores = (k if recipe.score.combine == "duplication" else  # DART ranks by these keys
                                  scoring.visual_scores(recipe.score, q, stack.repeat(k), positions, vis_start, n_vis))
            ctx = stack.attend(q, k, v, positions, positions)
            if recipe.prune_stage == "after_attention" and mlp_tokens[l] < n_vis:
                # FitPrune: rows leave after this layer's attention, before o_proj and the MLP
                if recipe.score.combine == "random":
                    scores = torch.from_numpy(random_scores(recipe.score.seed, l, n_vis)).to(x.device)
                else:
                    scores = scoring.visual_scores(recipe.score, q, stack.repeat(k), positions, vis_start, n_vis)
                keep_vis = scoring.select_top(scores, mlp_tokens[l])
                ctx, _ = select_rows(ctx, positions, vis_start, n_vis, keep_vis)
                x, positions = select_rows(x, positions, vis_start, n_vis, keep_vis)
                n_vis = mlp_tokens[l]
            x = x + layer.self_attn.o_proj(ctx)
            x = x + self.mlps[l](layer.post_attention_layernorm(x))
        if stop_after is not None:
            return x, state
        return stack.last_logits(x), state

    # the row selection the TokenSelect op reproduces (plugins/ops.py, tests/test_plugins.py)
    _select = staticmethod(select_rows)

    # ---- decode ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, token: int, position: int, state: PrefillState) -> torch.Tensor:
        stack = self.stack
        x = self.text.embed_tokens(torch.tensor([[token]]))
        pos = torch.tensor([position])
        for l, layer in enumerate(self.text.layers):
            if l in self.skipped:
                x = x + self.mlps[l](layer.post_attention_layernorm(x))
                continue
            q, k, v = stack.project(layer, layer.input_layernorm(x), pos)
            past_k, past_v = state.cache[l]
            k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            state.cache[l] = (k_all, v_all)
            state.kept[l] = torch.cat([state.kept[l], pos])
            x = x + layer.self_attn.o_proj(stack.attend(q, k_all, v_all, pos, state.kept[l]))
            x = x + self.mlps[l](layer.post_attention_layernorm(x))
        return stack.last_logits(x)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int,
                 eos_ids: set[int] = frozenset()) -> list[int]:
        input_ids = self.language_input_ids(input_ids)
        logits, state = self.prefill(input_ids, self.image_features(pixel_values))
        tokens: list[int] = []
        for step in range(max_new_tokens):
            token = int(logits.argmax(-1))
            tokens.append(token)
            if token in eos_ids or step == max_new_tokens - 1:
                break
            logits = self.decode(token, state.prompt_len + step, state)
        return tokens


def folded_mlps(text, recipe) -> dict:
    """Copies of the skipped layers' MLPs with the recipe's stand-in (formats/pia.py) folded into their weights."""
    import copy

    from mllm_deploy.formats.pia import fold, recipe_pia

    out = {}
    for l, (a, e) in recipe_pia(recipe).items():
        mlp = copy.deepcopy(text.layers[l].mlp)

        def io(linear):  # nn.Linear keeps [out, in]; fold works on [in, out]
            return linear.weight.detach().float().numpy().T

        gate, up, down = fold(io(mlp.gate_proj), io(mlp.up_proj), io(mlp.down_proj), a, e)
        with torch.no_grad():
            for linear, value in ((mlp.gate_proj, gate), (mlp.up_proj, up), (mlp.down_proj, down)):
                linear.weight.copy_(torch.from_numpy(value.T.copy()).to(linear.weight.dtype))
        out[l] = mlp
    return out
