"""calib-mllm --method mod: a mixture-of-depths recipe (layer plan, capacities, router), docs/mod.md.

Plans: ``arank`` keeps the ``dense_layers`` highest-ARank layers dense (gamma-MoD; ARank per token,
averaged over the calibration samples, recorded in the recipe), ``prd`` is p-MoD's progressive
ratio decay (its own capacities), ``layers=1,2,3`` an explicit list. Capacity ``c`` of a routed
layer means ``round(c * N)`` visual tokens processed there, between 1 and N - 1.

Routers: ``trained`` reads a checkpoint in the layout of formats/routers.py; ``attention``
has no parameters; ``fitted`` fits one linear router per routed layer on the frozen model:

- the calibration samples are run through the MoD model layer by layer, all samples together, so
  that layer ``l``'s router is fitted on the hidden states the routers of the layers before it
  produce (one pass over the data, not one per layer);
- features: each visual token's input RMSNorm output at the routed layer; target: the attention
  that layer's text queries (the tokens after the image, heads averaged) would pay the token if
  the layer processed every token, or the relative norm of the block's update (``update_norm``);
  the target is log-transformed and standardised per sample, since only the ranking within a
  prompt matters and attention is heavy-tailed;
- ridge regression in closed form (float64 normal equations, bias unpenalised);
- fit quality: top-k overlap ``|topk(router) & topk(target)| / k`` on held-out samples (the last
  quarter; at least one when there are two or more samples) of a fit on the others, beside the
  in-sample overlap of the final fit on all samples and the ``k / N`` a random choice expects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mllm_deploy.calib.common import CalibRun, CommonOptions, float_list, option, progress
from mllm_deploy.formats.recipe import MOD_ROUTERS, MOD_SKIP_RULES, ModBlock, Recipe, ScoreSpec, model_ref
from mllm_deploy.core.errors import MllmError

PLANS = ("arank", "prd", "layers=...")
FIT_TARGETS = ("attention", "update_norm")
RIDGE = 0.1  # relative to the mean feature energy trace(X^T X) / d; held-out overlap is flat in 1e-3..10 on tiny models
MOD_SCORE = ScoreSpec(query_rows="text", head_reduction="mean")  # attention router and the fitting target


@dataclass(frozen=True)
class ModOptions(CommonOptions):
    plan: str = option("arank", "--plan", "routed layers: arank (default; needs --data), prd (p-MoD decay) or layers=L1,L2,...")
    capacity: list[float] | None = option(
        None, "--capacity", "share of visual tokens a routed layer processes: one value or one per routed layer (default 0.5)",
        float_list)
    dense_layers: int | None = option(None, "--dense-layers", "arank: highest-ARank layers kept dense (default 4)", int)
    router: str = option("fitted", "--router", "fitted (default; needs --data), attention, or trained (needs --router-file)")
    router_file: str | None = option(None, "--router-file", "trained router checkpoint (safetensors, layout in docs/mod.md)")
    skip: str = option("identity", "--skip", "skipped visual tokens: identity (default) or tanh_scale (p-MoD; trained routers)")
    fit_target: str = option("attention", "--fit-target", "fitted routers regress onto: attention (default) or update_norm")

    method = "mod"
    cli_group = "mod (mixture-of-depths, docs/mod.md)"
    flags_only_for_this_method = True  # --plan, --router, --skip ... with another --method: an error, not ignored


@dataclass(frozen=True)
class ModPlan:
    layers: list[int]
    capacity: list[float]  # per routed layer, share of the N visual tokens processed
    source: str  # "arank", "prd", "layers"


def parse_plan(text: str) -> tuple[str, list[int] | None]:
    if text in ("arank", "prd"):
        return text, None
    if text.startswith("layers="):
        try:
            layers = [int(v) for v in text[len("layers="):].split(",") if v.strip()]
        except ValueError:
            layers = []
        if layers:
            return "layers", layers
    raise MllmError(f"--plan must be arank, prd or layers=L1,L2,... (e.g. layers=2,3), got {text!r}")


def capacity_tokens(n_vis: int, ratio: float) -> int:
    return min(n_vis - 1, max(1, int(round(n_vis * ratio))))


def make_plan(kind: str, explicit: list[int] | None, capacity: list[float] | None, num_layers: int,
              arank: list[float] | None = None, dense_layers: int = 4) -> ModPlan:
    from mllm_deploy.calib.arank import arank_plan, prd_plan

    if kind == "prd":
        if capacity is not None:
            raise MllmError("--plan prd sets its own capacities (p-MoD's ratio decay); drop --capacity")
        layers, keep = prd_plan(num_layers)
        return ModPlan(layers, [round(keep[l], 6) for l in layers], "prd")
    if kind == "arank":
        if not 0 <= dense_layers < num_layers:
            raise MllmError(f"--dense-layers must be in 0..{num_layers - 1} for a {num_layers}-layer model, got {dense_layers}")
        layers = arank_plan(arank, dense_layers)
    else:
        layers = sorted(set(explicit))
        if layers[0] < 0 or layers[-1] >= num_layers:
            raise MllmError(f"--plan layers must lie in 0..{num_layers - 1} for a {num_layers}-layer model, got {explicit}")
    capacity = [0.5] if capacity is None else capacity
    if len(capacity) == 1:
        capacity = capacity * len(layers)
    if len(capacity) != len(layers):
        raise MllmError(f"--capacity has {len(capacity)} values for {len(layers)} routed layers {layers}; give one or one per layer")
    if any(not 0.0 < c < 1.0 for c in capacity):
        raise MllmError(f"--capacity values must be in (0, 1), got {capacity}")
    return ModPlan(layers, [float(c) for c in capacity], kind)


def mod_recipe(spec, plan: ModPlan, router: str, skip: str = "identity", selected_scale: str = "none",
               router_input: str = "input_norm", tanh_alpha: float | None = None, extra_mod: dict | None = None) -> Recipe:
    n = spec.visual_tokens
    if not plan.layers:
        raise MllmError("the MoD plan routes no layer; lower --dense-layers or name layers with --plan layers=...")
    if router == "attention" and plan.layers[0] == 0:
        raise MllmError("--router attention ranks with the previous layer's attention, so layer 0 cannot be routed;"
                        " keep it dense (--plan layers=... without 0, or more --dense-layers)")
    capacity = dict(zip(plan.layers, plan.capacity))
    visual = [capacity_tokens(n, capacity[l]) if l in capacity else n for l in range(spec.text.num_layers)]
    mod = ModBlock(layers=tuple(plan.layers), capacity=tuple(float(c) for c in plan.capacity), router=router,
                   router_input=router_input, skip=skip, selected_scale=selected_scale, tanh_alpha=tanh_alpha,
                   **(extra_mod or {}))
    return Recipe(model=model_ref(spec), method={"name": "mod", "plan": plan.source, "router": router},
                  visual_tokens=visual, score=MOD_SCORE, mod=mod)


# ---- calib-mllm --method mod ---------------------------------------------------------------------
def check_options(options: ModOptions) -> tuple[str, list[int] | None]:
    """Every bad combination of MoD flags fails here, before any model is loaded."""
    kind, explicit = parse_plan(options.plan)
    router = options.router
    if router not in MOD_ROUTERS:
        raise MllmError(f"--router must be one of {', '.join(MOD_ROUTERS)}, got {router!r}")
    if options.skip not in MOD_SKIP_RULES:
        raise MllmError(f"--skip must be one of {', '.join(MOD_SKIP_RULES)}, got {options.skip!r}")
    if options.fit_target not in FIT_TARGETS:
        raise MllmError(f"--fit-target must be one of {', '.join(FIT_TARGETS)}, got {options.fit_target!r}")
    if router == "trained" and not options.router_file:
        raise MllmError("--router trained needs --router-file (a safetensors checkpoint, layout in docs/mod.md)")
    if router != "trained" and options.router_file:
        raise MllmError(f"--router-file is for --router trained; --router {router} has no checkpoint")
    if options.skip == "tanh_scale" and router != "trained":
        raise MllmError(f"--skip tanh_scale scales skipped tokens by a TanhNorm of a trained router's score;"
                        f" --router {router} needs --skip identity")
    needs_data = kind == "arank" or router == "fitted"
    if needs_data and not options.data:
        why = "--plan arank" if kind == "arank" else "--router fitted"
        raise MllmError(f"{why} needs --data (a JSONL file or builtin:synthetic:N)")
    if kind != "arank" and options.dense_layers is not None:
        raise MllmError("--dense-layers applies to --plan arank only")
    return kind, explicit


def calibrate_mod(options: ModOptions, run: CalibRun) -> Recipe:
    kind, explicit = check_options(options)
    spec, log = run.spec, run.log
    dense_layers = 4 if options.dense_layers is None else options.dense_layers
    layers = spec.text.num_layers
    if kind == "arank" and not 0 <= dense_layers < layers:
        raise MllmError(f"--dense-layers must be in 0..{layers - 1} for a {layers}-layer model, got {dense_layers}")
    # plans that need no data are checked before any model is loaded
    plan = None if kind == "arank" else make_plan(kind, explicit, options.capacity, layers)
    if plan is not None and options.router == "attention" and plan.layers and plan.layers[0] == 0:
        mod_recipe(spec, plan, "attention")  # raises the one-line error
    inputs, reference = [], None
    if kind == "arank" or options.router == "fitted":
        inputs = run.inputs(options)
        reference = run.dense_reference()
    records: dict = {}
    if kind == "arank":
        from mllm_deploy.calib.arank import arank_table, collect_arank

        bar = progress(len(inputs), "arank")
        try:
            per_sample = []
            for input_ids, pixel_values in inputs:
                per_sample.append(collect_arank(reference, input_ids, reference.image_features(pixel_values)))
                bar.update(1)
        finally:
            bar.close()
        table = arank_table(per_sample)
        records["arank"] = {**table, "ranked_by": "arank_per_token", "dense_layers": dense_layers}
        # samples differ in length and ARank grows with it: rank by ARank per token
        plan = make_plan(kind, explicit, options.capacity, layers, table["arank_per_token"], dense_layers)
    settings = dict(router_input="input_norm", selected_scale="none", tanh_alpha=None)
    trained = None
    if options.router == "trained":
        from mllm_deploy.formats.routers import read_trained_checkpoint

        trained = read_trained_checkpoint(options.router_file, plan.layers, spec.text.hidden_size)
        uses_tanh = options.skip == "tanh_scale" or trained.selected_scale == "tanh_norm"
        settings = dict(router_input=trained.router_input, selected_scale=trained.selected_scale,
                        tanh_alpha=trained.tanh_alpha if uses_tanh else None)
        records["trained_from"] = {"file": str(options.router_file), "sha256": trained.source_sha256}
    recipe = mod_recipe(spec, plan, options.router, options.skip, extra_mod=records, **settings)
    from mllm_deploy.formats.routers import canonical_tensors

    if trained is not None:
        recipe.routers = canonical_tensors(trained.routers)
    elif options.router == "fitted":
        bar = progress(spec.text.num_layers, "fit routers", unit="layer")
        try:
            routers, quality = fit_routers(reference, recipe, inputs, options.fit_target, progress=lambda: bar.update(1))
        finally:
            bar.close()
        recipe.routers = canonical_tensors(routers)
        recipe.mod = replace(recipe.mod, fit_quality=quality)
        cell = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
        log("mod: fitted routers, top-k overlap with the target per layer (held-out / train / random): " + ", ".join(
            f"{l}: {cell(r['held_out'])} / {cell(r['train'])} / {cell(r['random'])}" for l, r in quality["layers"].items()))
    log(f"mod: plan {plan.source}, routed layers {plan.layers}, visual tokens processed per layer {recipe.visual_tokens},"
        f" router {options.router}, skip {options.skip}")
    return recipe


# ---- fitting ------------------------------------------------------------------------------------
def ridge_fit(features: np.ndarray, targets: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, float]:
    """Closed-form ridge regression with an unpenalised bias: (weight [d], bias)."""
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    mean_x, mean_y = x.mean(axis=0), y.mean()
    xc = x - mean_x
    gram = xc.T @ xc
    penalty = ridge * max(np.trace(gram) / gram.shape[0], 1e-12)
    weight = np.linalg.solve(gram + penalty * np.eye(gram.shape[0]), xc.T @ (y - mean_y))
    return weight, float(mean_y - mean_x @ weight)


def standardised_log(target: np.ndarray) -> np.ndarray:
    logged = np.log(np.maximum(np.asarray(target, np.float64), 1e-12))
    return (logged - logged.mean()) / max(logged.std(), 1e-12)


def topk_overlap(predicted: np.ndarray, target: np.ndarray, k: int) -> float:
    def top(scores: np.ndarray) -> set[int]:
        return set(np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k].tolist())

    return len(top(predicted) & top(target)) / k


def fit_routers(reference, recipe: Recipe, inputs: list, target: str, progress=None,
                ridge: float = RIDGE) -> tuple[dict, dict]:
    """Fit one linear router per routed layer of ``recipe`` (router ``fitted``) on calibration ``inputs``
    [(input_ids, pixel_values)]. Returns (routers by layer, fit-quality record)."""
    import torch

    from mllm_deploy.calib.mod_reference import ModExecutor
    from mllm_deploy.formats.routers import LinearRouter

    routers: dict[int, LinearRouter] = {}
    executor = ModExecutor(reference, recipe, routers)
    samples = len(inputs)
    held_out = max(1, round(samples * 0.25)) if samples >= 2 else 0
    train = samples - held_out
    quality: dict = {"target": target, "metric": "top-k overlap of router and target",
                     "held_out_samples": held_out, "ridge": ridge, "layers": {}}
    with torch.no_grad():
        runs = [executor.start(ids, reference.image_features(pixels)) for ids, pixels in inputs]
        for l in range(recipe.num_layers):
            if l in executor.routed:
                k = recipe.visual_tokens[l]
                features = [executor.router_input(l, run).float().numpy() for run in runs]
                raw = [(executor.dense_attention_scores(l, run) if target == "attention"
                        else executor.dense_update_norm(l, run)).numpy() for run in runs]
                scaled = [standardised_log(t) for t in raw]
                record = {"random": k / runs[0].n_vis}
                if held_out:
                    weight, bias = ridge_fit(np.concatenate(features[:train]), np.concatenate(scaled[:train]), ridge)
                    record["held_out"] = float(np.mean([topk_overlap(f @ weight + bias, t, k)
                                                        for f, t in zip(features[train:], raw[train:])]))
                else:
                    record["held_out"] = None
                weight, bias = ridge_fit(np.concatenate(features), np.concatenate(scaled), ridge)
                routers[l] = LinearRouter(weight.astype(np.float32), float(np.float32(bias)))
                predicted = [executor.scores(l, run).numpy() for run in runs]  # as the model will score them
                record["train"] = float(np.mean([topk_overlap(p, t, k) for p, t in zip(predicted, raw)]))
                quality["layers"][str(l)] = record
            for run in runs:
                executor.step(l, run)
            if progress is not None:
                progress()
    return routers, quality
