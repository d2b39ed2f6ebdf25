"""VTW (METHODS.md): withdraw every visual token at layer K, K found by a KL test.

For each calibration sample, p_full is the dense model's first-token distribution and p_k the
same with the withdrawal at layer k; K is the first k whose mean KL(p_k || p_full) <= eta.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_deploy.calib.common import CalibRun, CommonOptions, option, progress
from mllm_deploy.core.errors import MllmError
from mllm_deploy.formats.recipe import Recipe, model_ref


@dataclass(frozen=True)
class VtwOptions(CommonOptions):
    eta: float = option(0.003, "--vtw-eta", "KL threshold (default 0.003, LLaVA-1.5-7B)", float)
    first_layer: int = option(5, "--vtw-first-layer", "first candidate layer (default 5)", int)

    method = cli_group = "vtw"


def calibrate_vtw(options: VtwOptions, run: CalibRun) -> Recipe:
    if not options.data:
        raise MllmError("--method vtw needs --data (a JSONL file or builtin:synthetic:N)")
    spec = run.spec
    inputs = run.inputs(options)
    model = run.hf_model()
    bar = progress(len(inputs), "vtw KL search")
    try:
        curve = kl_curve(model, spec, inputs, options.first_layer, progress=lambda: bar.update(1), pre_llm=run.pre_llm)
    finally:
        bar.close()
    layer = choose_layer(curve, options.eta, spec.text.num_layers)
    recipe = vtw_recipe_at(spec, layer)
    recipe.method = {"name": "vtw", "eta": options.eta, "layer": layer}
    recipe.extra = {"kl_curve": {str(k): v for k, v in sorted(curve.items())},
                    "withdrawn": layer < spec.text.num_layers}
    run.log(f"vtw: withdrawal layer {layer} (eta {options.eta}); KL curve "
            + ", ".join(f"{k}:{v:.2e}" for k, v in sorted(curve.items())))
    return recipe


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


def kl_curve(model, spec, inputs: list, first_layer: int = 5, progress=None, pre_llm=None) -> dict[int, float]:
    """Mean KL(p_k || p_full) over the samples for each candidate withdrawal layer (``pre_llm``: the stage the
    visual tokens went through first, calib-mllm --pre-llm)."""
    from mllm_deploy.formats.recipe import dense_recipe
    from mllm_deploy.calib.reference import RecipeReference

    dense = RecipeReference(model, dense_recipe(spec), pre_llm=pre_llm)
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
