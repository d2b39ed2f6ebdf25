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

from dataclasses import dataclass

import numpy as np

from mllm_deploy.formats.recipe import Recipe, ScoreSpec, model_ref
from mllm_deploy.core.errors import MllmError

PLANS = ("arank", "prd", "layers=...")
FIT_TARGETS = ("attention", "update_norm")
RIDGE = 0.1  # relative to the mean feature energy trace(X^T X) / d; held-out overlap is flat in 1e-3..10 on tiny models
MOD_SCORE = ScoreSpec(query_rows="text", head_reduction="mean")  # attention router and the fitting target


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
    mod = {"layers": list(plan.layers), "capacity": [float(c) for c in plan.capacity], "router": router,
           "router_input": router_input, "skip": skip, "selected_scale": selected_scale, "router_file": None,
           "router_sha256": None, "tanh_alpha": tanh_alpha, **(extra_mod or {})}
    return Recipe(model=model_ref(spec), method={"name": "mod", "plan": plan.source, "router": router},
                  visual_tokens=visual, score=MOD_SCORE, mod=mod)


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
