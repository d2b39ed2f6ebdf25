"""calib-mllm's work: model + data + method -> Recipe, with provenance and FLOPs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mllm_deploy import __version__
from mllm_deploy.calib.recipe import Recipe
from mllm_deploy.core.errors import MllmError

DATA_METHODS = ("vtw", "fitprune")


@dataclass
class CalibOptions:
    method: str
    data: str | None = None
    skip_bad: bool = False
    seed: int = 0
    fastv_k: int = 2
    fastv_r: float = 0.5
    pdrop_layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    pdrop_ratio: float = 0.5
    vtw_eta: float = 0.003
    vtw_first_layer: int = 5
    budget: float | None = None
    schedule: list[int] | None = None
    text_tokens: int = 64  # for the recipe's FLOPs figures
    random_selection: bool = False  # baseline: same token counts, a fixed random subset kept


def model_inputs(model_dir: Path, samples) -> list:
    """(input_ids, pixel_values) per sample, built by the model's own Hugging Face processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    inputs = []
    for sample in samples:
        messages = [{"role": "user", "content": [{"type": "image", "image": sample.image},
                                                 {"type": "text", "text": sample.prompt}]}]
        enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")
        inputs.append((enc["input_ids"], enc["pixel_values"]))
    return inputs


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", leave=False, dynamic_ncols=True)


def calibrate(model: str, options: CalibOptions, log=print) -> Recipe:
    from mllm_deploy.calib import static_methods
    from mllm_deploy.calib.flops import prefill_cost
    from mllm_deploy.models.registry import load_spec

    started = time.perf_counter()
    model_dir, spec = load_spec(model)
    method = options.method
    provenance: dict = {"tool": f"mllm-deploy {__version__}", "seed": options.seed}
    if method == "dense":
        recipe = static_methods.dense_recipe(spec)
    elif method == "fastv":
        recipe = static_methods.fastv_recipe(spec, options.fastv_k, options.fastv_r)
    elif method == "pdrop":
        recipe = static_methods.pdrop_recipe(spec, options.pdrop_layers, options.pdrop_ratio)
    elif method == "fitprune" and options.schedule is not None:
        recipe = static_methods.fitprune_from_schedule(spec, options.schedule)
    elif method in DATA_METHODS:
        if not options.data:
            raise MllmError(f"--method {method} needs --data (a JSONL file or builtin:synthetic:N)")
        if method == "fitprune" and options.budget is None:
            raise MllmError("--method fitprune needs --budget (FLOPs reduction, e.g. 0.5) or --schedule")
        if method == "fitprune" and not 0.0 < options.budget < 1.0:
            raise MllmError(f"--budget must be in (0, 1), got {options.budget}")
        from mllm_deploy.calib.data import data_hash, load_calibration_data

        samples = load_calibration_data(options.data, options.skip_bad, options.seed)
        provenance.update({"data": options.data, "data_sha256": data_hash(samples), "samples": len(samples)})
        inputs = model_inputs(model_dir, samples)
        from mllm_deploy.models.loading import load_hf_model

        hf_model = load_hf_model(model_dir)
        recipe = _vtw(hf_model, spec, inputs, options, log) if method == "vtw" else _fitprune(hf_model, spec, inputs, options, log)
    else:
        raise MllmError(f"unknown --method {method}")
    if options.random_selection:
        if recipe.method_name == "dense":
            raise MllmError("--random-selection needs a pruning method")
        from dataclasses import replace

        recipe.score = replace(recipe.score, combine="random", seed=options.seed)
        recipe.method = {**recipe.method, "selection": "random"}
    dense = prefill_cost(spec, None, options.text_tokens, "exact")
    pruned = prefill_cost(spec, recipe, options.text_tokens, "exact")
    recipe.flops = {"formula": "exact", "text_tokens": options.text_tokens, "dense": dense.dense,
                    "recipe": pruned.recipe, "reduction": pruned.reduction}
    seconds = time.perf_counter() - started
    provenance["seconds"] = round(seconds, 3)
    if "samples" in provenance:
        provenance["seconds_per_sample"] = round(seconds / provenance["samples"], 4)
    recipe.provenance = provenance
    recipe.validate()
    return recipe


def _vtw(model, spec, inputs, options: CalibOptions, log) -> Recipe:
    from mllm_deploy.calib import vtw

    bar = _progress(len(inputs), "vtw KL search")
    try:
        curve = vtw.kl_curve(model, spec, inputs, options.vtw_first_layer, progress=lambda: bar.update(1))
    finally:
        bar.close()
    layer = vtw.choose_layer(curve, options.vtw_eta, spec.text.num_layers)
    recipe = vtw.vtw_recipe_at(spec, layer)
    recipe.method = {"name": "vtw", "eta": options.vtw_eta, "layer": layer}
    recipe.extra = {"kl_curve": {str(k): v for k, v in sorted(curve.items())},
                    "withdrawn": layer < spec.text.num_layers}
    log(f"vtw: withdrawal layer {layer} (eta {options.vtw_eta}); KL curve "
        + ", ".join(f"{k}:{v:.2e}" for k, v in sorted(curve.items())))
    return recipe


def _fitprune(model, spec, inputs, options: CalibOptions, log) -> Recipe:
    from mllm_deploy.calib import fitprune
    from mllm_deploy.calib.recipe import dense_recipe
    from mllm_deploy.calib.reference import RecipeReference

    reference = RecipeReference(model, dense_recipe(spec))
    stats = []
    bar = _progress(len(inputs), "fitprune statistics")
    try:
        for input_ids, pixel_values in inputs:
            stats.append(fitprune.collect_stats(reference, input_ids, reference.image_features(pixel_values)))
            bar.update(1)
    finally:
        bar.close()
    search = fitprune.search_alpha(stats, options.budget, spec.text.hidden_size, spec.text.intermediate_size)
    if not search.feasible:
        raise MllmError(f"FitPrune cannot reach a {options.budget:.0%} reduction on this data even at alpha=1"
                        f" (best {search.reduction:.1%}); lower --budget")
    log(f"fitprune: alpha {search.alpha:.2f}, FitPrune-MACs reduction {search.reduction:.1%},"
        f" removed per layer {search.schedule}")
    return fitprune.fitprune_recipe(spec, search, options.budget)
