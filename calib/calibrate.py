"""calib-mllm's work: model + data + method -> Recipe, with provenance and FLOPs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mllm_deploy import __version__
from mllm_deploy.formats.recipe import Recipe
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
    # mixture-of-depths (calib/mod.py, docs/mod.md)
    mod_plan: str = "arank"  # arank | prd | layers=L1,L2,...
    mod_capacity: list[float] | None = None  # one share for every routed layer, or one per routed layer
    mod_dense_layers: int | None = None  # arank: layers kept dense (default 4, gamma-MoD)
    mod_router: str = "fitted"  # fitted | attention | trained
    mod_router_file: str | None = None  # trained: checkpoint in formats/routers.py's layout
    mod_skip: str = "identity"  # identity | tanh_scale
    mod_fit_target: str = "attention"  # fitted: attention | update_norm


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


def _progress(total: int, desc: str, unit: str = "sample"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def calibrate(model: str, options: CalibOptions, log=print) -> Recipe:
    from mllm_deploy.calib import static_methods
    from mllm_deploy.formats.flops import prefill_cost
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
    elif method == "mod":
        recipe = _mod(model_dir, spec, options, provenance, log)
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
        if recipe.method_name in ("dense", "mod"):
            raise MllmError(f"--random-selection needs a pruning method, not {recipe.method_name}")
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
    from mllm_deploy.formats.recipe import dense_recipe
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


def _check_mod_options(options: CalibOptions) -> tuple[str, list[int] | None]:
    """Every bad combination of MoD flags fails here, before any model is loaded."""
    from mllm_deploy.calib.mod import FIT_TARGETS, parse_plan
    from mllm_deploy.formats.recipe import MOD_ROUTERS, MOD_SKIP_RULES

    kind, explicit = parse_plan(options.mod_plan)
    router = options.mod_router
    if router not in MOD_ROUTERS:
        raise MllmError(f"--router must be one of {', '.join(MOD_ROUTERS)}, got {router!r}")
    if options.mod_skip not in MOD_SKIP_RULES:
        raise MllmError(f"--skip must be one of {', '.join(MOD_SKIP_RULES)}, got {options.mod_skip!r}")
    if options.mod_fit_target not in FIT_TARGETS:
        raise MllmError(f"--fit-target must be one of {', '.join(FIT_TARGETS)}, got {options.mod_fit_target!r}")
    if router == "trained" and not options.mod_router_file:
        raise MllmError("--router trained needs --router-file (a safetensors checkpoint, layout in docs/mod.md)")
    if router != "trained" and options.mod_router_file:
        raise MllmError(f"--router-file is for --router trained; --router {router} has no checkpoint")
    if options.mod_skip == "tanh_scale" and router != "trained":
        raise MllmError(f"--skip tanh_scale scales skipped tokens by a TanhNorm of a trained router's score;"
                        f" --router {router} needs --skip identity")
    needs_data = kind == "arank" or router == "fitted"
    if needs_data and not options.data:
        why = "--plan arank" if kind == "arank" else "--router fitted"
        raise MllmError(f"{why} needs --data (a JSONL file or builtin:synthetic:N)")
    if kind != "arank" and options.mod_dense_layers is not None:
        raise MllmError("--dense-layers applies to --plan arank only")
    return kind, explicit


def _mod(model_dir, spec, options: CalibOptions, provenance: dict, log) -> Recipe:
    from mllm_deploy.calib import mod

    kind, explicit = _check_mod_options(options)
    dense_layers = 4 if options.mod_dense_layers is None else options.mod_dense_layers
    layers = spec.text.num_layers
    if kind == "arank" and not 0 <= dense_layers < layers:
        raise MllmError(f"--dense-layers must be in 0..{layers - 1} for a {layers}-layer model, got {dense_layers}")
    # plans that need no data are checked before any model is loaded
    plan = None if kind == "arank" else mod.make_plan(kind, explicit, options.mod_capacity, layers)
    if plan is not None and options.mod_router == "attention" and plan.layers and plan.layers[0] == 0:
        mod.mod_recipe(spec, plan, "attention")  # raises the one-line error
    inputs, reference = [], None
    if kind == "arank" or options.mod_router == "fitted":
        from mllm_deploy.calib.data import data_hash, load_calibration_data
        from mllm_deploy.formats.recipe import dense_recipe
        from mllm_deploy.calib.reference import RecipeReference
        from mllm_deploy.models.loading import load_hf_model

        samples = load_calibration_data(options.data, options.skip_bad, options.seed)
        provenance.update({"data": options.data, "data_sha256": data_hash(samples), "samples": len(samples)})
        inputs = model_inputs(model_dir, samples)
        reference = RecipeReference(load_hf_model(model_dir), dense_recipe(spec))
    extra_mod: dict = {}
    arank = None
    if kind == "arank":
        from mllm_deploy.calib.arank import arank_table, collect_arank

        bar = _progress(len(inputs), "arank")
        try:
            per_sample = []
            for input_ids, pixel_values in inputs:
                per_sample.append(collect_arank(reference, input_ids, reference.image_features(pixel_values)))
                bar.update(1)
        finally:
            bar.close()
        table = arank_table(per_sample)
        arank = table["arank_per_token"]  # samples differ in length; ARank grows with it
        extra_mod["arank"] = {**table, "ranked_by": "arank_per_token", "dense_layers": dense_layers}
    if plan is None:
        plan = mod.make_plan(kind, explicit, options.mod_capacity, layers, arank, dense_layers)
    settings = dict(router_input="input_norm", selected_scale="none", tanh_alpha=None)
    trained = None
    if options.mod_router == "trained":
        from mllm_deploy.formats.routers import read_trained_checkpoint

        trained = read_trained_checkpoint(options.mod_router_file, plan.layers, spec.text.hidden_size)
        uses_tanh = options.mod_skip == "tanh_scale" or trained.selected_scale == "tanh_norm"
        settings = dict(router_input=trained.router_input, selected_scale=trained.selected_scale,
                        tanh_alpha=trained.tanh_alpha if uses_tanh else None)
        extra_mod["trained_from"] = {"file": str(options.mod_router_file), "sha256": trained.source_sha256}
    recipe = mod.mod_recipe(spec, plan, options.mod_router, options.mod_skip, extra_mod=extra_mod, **settings)
    from mllm_deploy.formats.routers import canonical_tensors

    if trained is not None:
        recipe.routers = canonical_tensors(trained.routers)
    elif options.mod_router == "fitted":
        bar = _progress(spec.text.num_layers, "fit routers", unit="layer")
        try:
            routers, quality = mod.fit_routers(reference, recipe, inputs, options.mod_fit_target,
                                               progress=lambda: bar.update(1))
        finally:
            bar.close()
        recipe.routers = canonical_tensors(routers)
        recipe.mod["fit_quality"] = quality
        cell = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
        log("mod: fitted routers, top-k overlap with the target per layer (held-out / train / random): " + ", ".join(
            f"{l}: {cell(r['held_out'])} / {cell(r['train'])} / {cell(r['random'])}" for l, r in quality["layers"].items()))
    log(f"mod: plan {plan.source}, routed layers {plan.layers}, visual tokens processed per layer {recipe.visual_tokens},"
        f" router {options.mod_router}, skip {options.mod_skip}")
    return recipe
