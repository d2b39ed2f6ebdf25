"""VTW (METHODS.md): withdraw every visual token at layer K, K found by a KL test.

For each calibration sample, p_full is the dense model's first-token distribution and p_k the
same with the withdrawal at layer k; K is the first k whose mean KL(p_k || p_full) <= eta.
"""

from __future__ import annotations

import numpy as np

from mllm_deploy.formats.recipe import Recipe, model_ref


def vtw_recipe_at(spec, k: int) -> Recipe:
    n, layers = spec.visual_tokens, spec.text.num_layers
    return Recipe(model=model_ref(spec), method={"name": "vtw", "layer": k},
                  visual_tokens=[n] * k + [0] * (layers - k))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) from logits, in float64."""
    p_log = p_logits - np.logaddexp.reduce(p_logits)
    q_log = q_logits - np.logaddexp.reduce(q_logits)
    return float(np.sum(np.exp(p_log) * (p_log - q_log)))


def candidate_layers(num_layers: int, first: int = 5) -> list[int]:
    """k in first..L-1 (authors: 5); small models start at layer 1 so a search exists at all."""
    start = first if first < num_layers else 1
    return list(range(start, num_layers))


def kl_curve(model, spec, inputs: list, first_layer: int = 5, progress=None) -> dict[int, float]:
    """Mean KL(p_k || p_full) over the samples for each candidate withdrawal layer."""
    from mllm_deploy.formats.recipe import dense_recipe
    from mllm_deploy.calib.reference import RecipeReference

    dense = RecipeReference(model, dense_recipe(spec))
    layers = candidate_layers(spec.text.num_layers, first_layer)
    references = {k: RecipeReference(model, vtw_recipe_at(spec, k)) for k in layers}
    totals = {k: 0.0 for k in layers}
    for input_ids, pixel_values in inputs:
        features = dense.image_features(pixel_values)
        p_full = dense.prefill(input_ids, features)[0][0].double().numpy()
        for k in layers:
            p_k = references[k].prefill(input_ids, features)[0][0].double().numpy()
            totals[k] += kl_divergence(p_k, p_full)
        if progress is not None:
            progress()
    return {k: totals[k] / len(inputs) for k in layers}


def choose_layer(curve: dict[int, float], eta: float, num_layers: int) -> int:
    """First k with mean KL <= eta; num_layers (no withdrawal) when none qualifies."""
    for k in sorted(curve):
        if curve[k] <= eta:
            return k
    return num_layers
