"""FitPrune (METHODS.md): attention statistics on the unpruned model, FIT(alpha) walk, and the
binary search on alpha for the smallest alpha whose averaged recipe meets a FLOPs budget.

Statistics per sample and layer, heads combined by max (A = max_h attention):
``self_block[l]`` = A[visual rows, visual cols] ([N, N]) and ``cross[l][j]`` = mean over text
rows of A[i, j] ([N]). The walk needs the visual block because the self score of a token is
re-summed over the tokens still present.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_deploy.calib.common import CalibRun, CommonOptions, int_list, option, progress
from mllm_deploy.core.errors import MllmError
from mllm_deploy.formats.flops import fitprune_layer_macs
from mllm_deploy.formats.recipe import Recipe


@dataclass(frozen=True)
class FitPruneOptions(CommonOptions):
    budget: float | None = option(None, "--budget", "FLOPs reduction target, e.g. 0.5", float)
    schedule: list[int] | None = option(
        None, "--schedule", "published tokens removed after each layer, e.g. 3,7,49,...", int_list)

    method = cli_group = "fitprune"


def calibrate_fitprune(options: FitPruneOptions, run: CalibRun) -> Recipe:
    """From a published schedule (no data), or by searching alpha on calibration data for a FLOPs budget."""
    from mllm_deploy.calib.static_methods import fitprune_from_schedule

    spec = run.spec
    if options.schedule is not None:
        return fitprune_from_schedule(spec, options.schedule)
    if not options.data:
        raise MllmError("--method fitprune needs --data (a JSONL file or builtin:synthetic:N)")
    if options.budget is None:
        raise MllmError("--method fitprune needs --budget (FLOPs reduction, e.g. 0.5) or --schedule")
    if not 0.0 < options.budget < 1.0:
        raise MllmError(f"--budget must be in (0, 1), got {options.budget}")
    inputs = run.inputs(options)
    reference = run.dense_reference()
    stats = []
    bar = progress(len(inputs), "fitprune statistics")
    try:
        for input_ids, pixel_values in inputs:
            stats.append(collect_stats(reference, input_ids, reference.image_features(pixel_values)))
            bar.update(1)
    finally:
        bar.close()
    search = search_alpha(stats, options.budget, spec.text.hidden_size, spec.text.intermediate_size)
    if not search.feasible:
        raise MllmError(f"FitPrune cannot reach a {options.budget:.0%} reduction on this data even at alpha=1"
                        f" (best {search.reduction:.1%}); lower --budget")
    run.log(f"fitprune: alpha {search.alpha:.2f}, FitPrune-MACs reduction {search.reduction:.1%},"
            f" removed per layer {search.schedule}")
    return fitprune_recipe(spec, search, options.budget)


@dataclass
class SampleStats:
    self_block: np.ndarray  # [L, N, N] float32
    cross: np.ndarray  # [L, N] float32


def collect_stats(reference, input_ids, features) -> SampleStats:
    """One dense prefill with an observer that keeps only the two FitPrune statistics per layer."""
    import torch

    from mllm_deploy.calib import scoring

    blocks, crosses = [], []

    def observe(layer, q, k, positions, vis_start, n_vis):
        rows = torch.arange(vis_start, q.shape[2])  # visual rows, then the text rows after them
        probs = scoring.attention_rows(q, k, rows, positions).amax(dim=0)[:, vis_start:vis_start + n_vis]
        blocks.append(probs[:n_vis].numpy())
        crosses.append(probs[n_vis:].mean(dim=0).numpy())

    reference.prefill(input_ids, features, observer=observe)
    return SampleStats(np.stack(blocks).astype(np.float32), np.stack(crosses).astype(np.float32))


def largest_removable(scores: np.ndarray, keep_mass: float) -> np.ndarray:
    """Indices of the largest set of lowest-scored entries whose removal keeps >= keep_mass."""
    order = np.argsort(scores, kind="stable")
    remaining = scores.sum() - np.cumsum(scores[order])
    count = int(np.searchsorted(-remaining, -keep_mass, side="right"))  # remaining is non-increasing
    return order[:count]


def fit_walk(stats: SampleStats, alpha: float, budget: float, d: int, m: int) -> tuple[list[int], bool]:
    """FIT(alpha) on one sample: tokens removed after each layer, and whether the budget was met."""
    layers, n0 = stats.cross.shape
    dense = layers * fitprune_layer_macs(d, m, n0, n0)
    target = (1.0 - budget) * dense
    w_self = stats.self_block.sum(axis=(1, 2)) / n0
    w_cross = stats.cross.sum(axis=1)
    current = np.arange(n0)
    removed = [0] * layers
    spent = 0.0
    for l in range(layers):
        n_in = len(current)
        self_scores = stats.self_block[l][np.ix_(current, current)].sum(axis=0) / max(n_in, 1)
        cross_scores = stats.cross[l][current]
        drop_self = largest_removable(self_scores, (1 - alpha) * w_self[l])
        drop_cross = largest_removable(cross_scores, (1 - alpha) * w_cross[l])
        drop = np.intersect1d(drop_self, drop_cross)
        current = np.delete(current, drop)
        removed[l] = len(drop)
        spent += fitprune_layer_macs(d, m, n_in, len(current))
        forecast = (layers - l - 1) * fitprune_layer_macs(d, m, len(current), len(current))
        if spent + forecast <= target:
            return removed, True
    return removed, False


def averaged_schedule(all_stats: list[SampleStats], alpha: float, budget: float, d: int, m: int) -> list[int]:
    """Per-layer removals averaged over the calibration set and floored."""
    walks = np.array([fit_walk(s, alpha, budget, d, m)[0] for s in all_stats], dtype=np.float64)
    return [int(v) for v in np.floor(walks.mean(axis=0))]


def schedule_reduction(schedule: list[int], n0: int, d: int, m: int) -> float:
    layers = len(schedule)
    dense = layers * fitprune_layer_macs(d, m, n0, n0)
    cost, current = 0.0, n0
    for removed in schedule:
        cost += fitprune_layer_macs(d, m, current, current - removed)
        current -= removed
    return 1.0 - cost / dense


@dataclass
class FitSearch:
    alpha: float
    schedule: list[int]
    reduction: float  # FitPrune MACs model
    feasible: bool
    trace: list[tuple[float, float]]  # (alpha tried, reduction of its averaged schedule)


def search_alpha(all_stats: list[SampleStats], budget: float, d: int, m: int, precision: float = 0.01) -> FitSearch:
    """Smallest alpha in [0, 1] (to ``precision``) whose averaged, floored schedule meets the budget."""
    n0 = all_stats[0].cross.shape[1]
    trace = []

    def evaluate(alpha: float) -> tuple[list[int], float]:
        schedule = averaged_schedule(all_stats, alpha, budget, d, m)
        reduction = schedule_reduction(schedule, n0, d, m)
        trace.append((round(alpha, 6), reduction))
        return schedule, reduction

    schedule, reduction = evaluate(0.0)
    if reduction >= budget:
        return FitSearch(0.0, schedule, reduction, True, trace)
    best_schedule, best_reduction = evaluate(1.0)
    if best_reduction < budget:
        return FitSearch(1.0, best_schedule, best_reduction, False, trace)
    low, high = 0.0, 1.0
    while high - low > precision + 1e-12:
        mid = round((low + high) / 2, 6)
        schedule, reduction = evaluate(mid)
        if reduction >= budget:
            high, best_schedule, best_reduction = mid, schedule, reduction
        else:
            low = mid
    return FitSearch(high, best_schedule, best_reduction, True, trace)


def fitprune_recipe(spec, search: FitSearch, budget: float) -> Recipe:
    from mllm_deploy.calib.static_methods import fitprune_from_schedule

    recipe = fitprune_from_schedule(spec, search.schedule)
    recipe.method = {"name": "fitprune", "budget": budget, "alpha": search.alpha, "source": "calibration"}
    recipe.extra = {"fitprune_macs_reduction": search.reduction, "feasible": search.feasible,
                    "alpha_trace": [list(t) for t in search.trace], "removed_per_layer": search.schedule}
    return recipe
