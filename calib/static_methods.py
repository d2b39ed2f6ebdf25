"""Recipes that need no calibration data: dense, FastV, PyramidDrop, FitPrune from a schedule.

They work from a ModelSpec alone (a directory holding only config.json), so a recipe for a
7B or 13B geometry can be made on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm_deploy.calib.common import CalibRun, CommonOptions, int_list, option
from mllm_deploy.formats.recipe import Recipe, ScoreSpec, dense_recipe, model_ref
from mllm_deploy.core.errors import RecipeError


@dataclass(frozen=True)
class DenseOptions(CommonOptions):
    method = "dense"


@dataclass(frozen=True)
class FastVOptions(CommonOptions):
    k: int = option(2, "--fastv-k", "first pruned layer (default 2)", int)
    r: float = option(0.5, "--fastv-r", "share of visual tokens dropped (default 0.5)", float)

    method = cli_group = "fastv"


@dataclass(frozen=True)
class PDropOptions(CommonOptions):
    layers: tuple[int, ...] = option((8, 16, 24), "--pdrop-layers", "stage layers (default 8,16,24)", int_list)
    ratio: float = option(0.5, "--pdrop-ratio", "keep ratio per stage (default 0.5)", float)

    method = cli_group = "pdrop"


def calibrate_dense(options: DenseOptions, run: CalibRun) -> Recipe:
    return dense_recipe(run.spec)


def calibrate_fastv(options: FastVOptions, run: CalibRun) -> Recipe:
    return fastv_recipe(run.spec, options.k, options.r)


def calibrate_pdrop(options: PDropOptions, run: CalibRun) -> Recipe:
    return pdrop_recipe(run.spec, options.layers, options.ratio)

FITPRUNE_SCORE = ScoreSpec(query_rows="visual_and_text", head_reduction="max", combine="self_times_cross")


def fastv_recipe(spec, k: int = 2, r: float = 0.5) -> Recipe:
    """FastV: layers < K run in full; from layer K keep round(N(1-R)) tokens ranked by the
    attention the last token pays them in layer K-1 (heads averaged), as the authors' code."""
    n, layers = spec.visual_tokens, spec.text.num_layers
    if not 1 <= k < layers:
        raise RecipeError(f"--fastv-k must be in 1..{layers - 1} for a {layers}-layer model, got {k}")
    if not 0.0 <= r < 1.0:
        raise RecipeError(f"--fastv-r must be in [0, 1), got {r}")
    keep = int(round(n * (1 - r)))
    return Recipe(
        model=model_ref(spec),
        method={"name": "fastv", "k": k, "r": r},
        visual_tokens=[n] * k + [keep] * (layers - k),
        score=ScoreSpec(query_rows="last_text", head_reduction="mean", attention_layer_offset=-1),
    )


def pdrop_recipe(spec, stage_layers: list[int] | tuple[int, ...] = (8, 16, 24), ratio: float = 0.5) -> Recipe:
    """PyramidDrop: at each stage layer keep ``ratio`` of the tokens, ranked by that layer's
    attention from the last instruction token. Positions stay original (the authors renumber)."""
    n, layers = spec.visual_tokens, spec.text.num_layers
    stages = sorted(set(int(s) for s in stage_layers))
    if not stages or stages[0] < 1 or stages[-1] >= layers:
        raise RecipeError(f"--pdrop-layers must lie in 1..{layers - 1} for a {layers}-layer model, got {list(stage_layers)}")
    if not 0.0 < ratio < 1.0:
        raise RecipeError(f"--pdrop-ratio must be in (0, 1), got {ratio}")
    visual, current = [], n
    for layer in range(layers):
        if layer in stages:
            current = int(round(current * ratio))
        visual.append(current)
    return Recipe(
        model=model_ref(spec),
        method={"name": "pdrop", "layers": stages, "ratio": ratio,
                "deviation": "original position ids kept; the authors' code renumbers contiguously"},
        visual_tokens=visual,
        score=ScoreSpec(query_rows="last_text", head_reduction="mean", attention_layer_offset=0),
    )


def fitprune_from_schedule(spec, removed_per_layer: list[int]) -> Recipe:
    """FitPrune with published per-layer removal counts (tokens removed after each layer's attention)."""
    n, layers = spec.visual_tokens, spec.text.num_layers
    if len(removed_per_layer) != layers:
        raise RecipeError(f"--schedule has {len(removed_per_layer)} counts for a {layers}-layer model")
    if any(r < 0 for r in removed_per_layer) or sum(removed_per_layer) > n:
        raise RecipeError(f"--schedule counts must be >= 0 and sum to at most {n} visual tokens")
    visual, current = [], n
    for removed in removed_per_layer:
        visual.append(current)
        current -= removed
    return Recipe(
        model=model_ref(spec),
        method={"name": "fitprune", "schedule": list(removed_per_layer), "source": "schedule"},
        visual_tokens=visual,
        prune_stage="after_attention",
        final_visual_tokens=current,
        score=FITPRUNE_SCORE,
    )


def removed_per_layer(recipe: Recipe) -> list[int]:
    """Tokens removed after each layer of an after_attention recipe (FitPrune's schedule form)."""
    mlp = recipe.mlp_visual_tokens()
    return [a - b for a, b in zip(recipe.visual_tokens, mlp)]


__all__ = ["dense_recipe", "fastv_recipe", "pdrop_recipe", "fitprune_from_schedule", "removed_per_layer"]
