"""calib-mllm --method eas: remove the least needed multi-head attentions (EAS, "Not All Attention is Needed").

Redundancy is measured the way VTW measures a withdrawal layer: the mean KL divergence, over the calibration
samples, of the first answer token's distribution with an attention removed from the dense model's. The plan is
greedy with re-measurement: each step tries every remaining layer on top of the layers already chosen and takes
the one whose removal costs least; ``--eas-skip N`` takes N steps, ``--eas-budget B`` steps while the KL stays <= B.

EAS trains a propagation-of-information adapter and re-parameterises it into the FFN. ``--pia`` fits a training-free
stand-in instead (formats/pia.py): two ridge least-squares maps on the calibration tokens, each of which folds
exactly into the layer's FFN weights, so it costs nothing at run time. A good token-level fit need not help the
answer, so each layer keeps the combination of its two maps (both, one, or none) with the lowest calibration KL.
The fit quality (R² on held-out tokens, every fifth), the maps kept and the KL with and without the stand-in are
recorded in the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_deploy.calib.common import CalibRun, CommonOptions, option, progress
from mllm_deploy.calib.vtw import kl_divergence
from mllm_deploy.core.errors import MllmError, RecipeError
from mllm_deploy.formats.recipe import Recipe, model_ref

HELD_OUT_EVERY = 5  # every fifth calibration token is held out of the stand-in's fit: it picks the ridge strength
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class EasOptions(CommonOptions):
    skip: int | None = option(None, "--eas-skip", "eas: how many layers lose their attention", int)
    budget: float | None = option(None, "--eas-budget",
                                  "eas: remove attentions while the mean KL of the first answer token stays <= B", float)
    pia: bool = option(False, "--pia", "eas: fit the training-free stand-in for each removed attention (folded"
                                       " into its FFN weights; no run-time cost)")
    pia_ridge: float | None = option(None, "--pia-ridge",
                                     "eas: ridge strength of the stand-in's fit (default: the best of"
                                     f" {', '.join(map(str, RIDGE_GRID))} on held-out tokens)", float)

    method = cli_group = "eas"
    flags_only_for_this_method = True


def eas_recipe(spec, skipped, method: dict | None = None) -> Recipe:
    n = spec.visual_tokens
    return Recipe(model=model_ref(spec), method=method or {"name": "eas"}, visual_tokens=[n] * spec.text.num_layers,
                  skip_attention=sorted(skipped))


def calibrate_eas(options: EasOptions, run: CalibRun) -> Recipe:
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.formats.recipe import dense_recipe

    if not options.data:
        raise MllmError("--method eas needs --data (a JSONL file or builtin:synthetic:N)")
    if (options.skip is None) == (options.budget is None):
        raise MllmError("--method eas needs --eas-skip N or --eas-budget B (one of them)")
    layers = run.spec.text.num_layers
    if options.skip is not None and not 1 <= options.skip < layers:
        raise RecipeError(f"--eas-skip must be in 1..{layers - 1} for a {layers}-layer model, got {options.skip}")
    if options.budget is not None and options.budget < 0:
        raise RecipeError(f"--eas-budget must be 0 or more, got {options.budget}")
    spec = run.spec
    inputs = run.inputs(options)
    model = run.hf_model()
    dense = RecipeReference(model, dense_recipe(spec), pre_llm=run.pre_llm)
    samples = []
    for input_ids, pixel_values in inputs:
        features = dense.image_features(pixel_values)
        samples.append((input_ids, features, dense.prefill(input_ids, features)[0][0].double().numpy()))

    def mean_kl(recipe: Recipe) -> float:
        reference = RecipeReference(model, recipe)
        return float(np.mean([kl_divergence(reference.prefill(ids, feats)[0][0].double().numpy(), p_full)
                              for ids, feats, p_full in samples]))

    steps = options.skip if options.skip is not None else layers - 1
    skipped: list[int] = []
    history = []
    bar = progress(steps * layers, "eas greedy search", unit="trial")
    try:
        for _ in range(steps):
            trials = {}
            for l in range(layers):
                if l not in skipped:
                    trials[l] = mean_kl(eas_recipe(spec, skipped + [l]))
                    bar.update(1)
            best = min(trials, key=lambda l: (trials[l], l))
            if options.budget is not None and trials[best] > options.budget:
                break
            skipped.append(best)
            history.append({"layer": best, "kl": trials[best], "tried": {str(l): v for l, v in sorted(trials.items())}})
    finally:
        bar.close()
    if not skipped:
        raise RecipeError(f"no attention can be removed within --eas-budget {options.budget} (the cheapest costs KL"
                          f" {min(trials.values()):.3g}); raise the budget")
    method = {"name": "eas", **({"skip": options.skip} if options.skip is not None else {"budget": options.budget}),
              "order": list(skipped), "kl": history[-1]["kl"], "pia": bool(options.pia)}
    recipe = eas_recipe(spec, skipped, method)
    recipe.extra = {"greedy": history}
    run.log("eas: attention removed in layers " + ", ".join(f"{h['layer']} (KL {h['kl']:.2e})" for h in history))
    if options.pia:
        fit_stand_in(recipe, model, samples, options.pia_ridge, run.log, score=mean_kl)
        recipe.pia["fit_quality"]["kl_with_pia"] = mean_kl(recipe)
        recipe.pia["fit_quality"]["kl_without_pia"] = history[-1]["kl"]
        run.log(f"eas: stand-in fitted; KL {history[-1]['kl']:.3e} -> {recipe.pia['fit_quality']['kl_with_pia']:.3e}")
    return recipe


def _ridge(x: np.ndarray, y: np.ndarray, strength: float, prior: np.ndarray | None = None) -> np.ndarray:
    """argmin_W |xW - y|² + λ|W - prior|², λ = strength · mean diagonal of xᵀx (scale-free)."""
    gram = x.T @ x
    lam = strength * float(np.trace(gram)) / gram.shape[0]
    rhs = x.T @ y + (lam * prior if prior is not None else 0.0)
    return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), rhs)


def _r2(prediction: np.ndarray, target: np.ndarray) -> float:
    residual = float(np.sum((prediction - target) ** 2))
    total = float(np.sum((target - target.mean(axis=0)) ** 2))
    return 1.0 - residual / total if total > 0 else 0.0


def fit_stand_in(recipe: Recipe, model, samples, strength: float | None, log=print, score=None) -> None:
    """Fit formats/pia.py's two maps for each skipped layer, in order, on the activations of the model with the
    attentions removed and the maps fitted so far; sets ``recipe.pia`` and ``recipe.pia_tensors``. ``score``
    (recipe -> calibration KL): each layer keeps the combination of its maps that scores lowest."""
    import torch

    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.formats.pia import down_key, input_key

    text = model.model.language_model
    d = text.config.hidden_size
    m = text.config.intermediate_size
    tensors = {}
    for l in recipe.skip_attention:  # identity until fitted: folding it changes nothing
        tensors[input_key(l)], tensors[down_key(l)] = np.eye(d, dtype=np.float32), np.zeros((m, d), np.float32)
    quality = {}
    for l in recipe.skip_attention:
        recipe.pia, recipe.pia_tensors = {"fit_quality": {}}, dict(tensors)
        reference = RecipeReference(model, recipe)
        layer = text.layers[l]
        h_rows, target_rows, c_rows = [], [], []
        with torch.no_grad():
            for ids, feats, _ in samples:
                x = reference.prefill(ids, feats, stop_after=l)[0]  # the input of layer l
                positions = torch.arange(x.shape[1])
                q, k, v = reference.stack.project(layer, layer.input_layernorm(x), positions)
                c = layer.self_attn.o_proj(reference.stack.attend(q, k, v, positions, positions))
                h_rows.append(layer.post_attention_layernorm(x)[0].double().numpy())
                target_rows.append(layer.post_attention_layernorm(x + c)[0].double().numpy())
                c_rows.append(c[0].double().numpy())
        h, target, c = (np.concatenate(rows) for rows in (h_rows, target_rows, c_rows))
        held = np.arange(len(h)) % HELD_OUT_EVERY == 0
        grid = RIDGE_GRID if strength is None else (strength,)
        # each map: the ridge strength that predicts the held-out tokens best; a map that predicts them worse
        # than none (identity, zero) is not used, so the stand-in never makes the layer worse than a bare skip
        a, a_strength, a_r2 = _best_ridge(h, target, held, grid, prior=np.eye(d))
        without = _r2(h[held], target[held])
        if a_r2 <= without:
            a, a_strength, a_r2 = np.eye(d), None, without
        mlp = layer.mlp
        with torch.no_grad():
            hz = torch.from_numpy(h @ a).to(mlp.gate_proj.weight.dtype)
            z = (mlp.act_fn(mlp.gate_proj(hz)) * mlp.up_proj(hz)).double().numpy()
        e, e_strength, e_r2 = _best_ridge(z, c, held, grid)
        if e_r2 <= 0.0:
            e, e_strength = np.zeros((m, d)), None
        used = "input+down"
        if score is not None:  # the maps that help the answer, judged on the calibration KL
            identity, zero = np.eye(d, dtype=np.float32), np.zeros((m, d), np.float32)
            trials = {}
            for name, (a_try, e_try) in {"input+down": (a, e), "input": (a, zero), "down": (identity, e),
                                         "none": (identity, zero)}.items():
                tensors[input_key(l)], tensors[down_key(l)] = a_try.astype(np.float32), e_try.astype(np.float32)
                recipe.pia, recipe.pia_tensors = {"fit_quality": {}}, dict(tensors)
                trials[name] = score(recipe)
            used = min(trials, key=lambda k: (trials[k], k != "none"))
            a = a if used in ("input+down", "input") else np.eye(d)
            e = e if used in ("input+down", "down") else np.zeros((m, d))
        tensors[input_key(l)], tensors[down_key(l)] = a.astype(np.float32), e.astype(np.float32)
        quality[str(l)] = {"maps_used": used, "ffn_input_r2": a_r2, "ffn_input_r2_without": without, "ffn_input_ridge": a_strength,
                           "attention_output_r2": e_r2, "attention_output_ridge": e_strength,
                           "tokens": int(len(h)), "held_out": int(held.sum())}
        log(f"eas: stand-in for layer {l}: FFN input R² {quality[str(l)]['ffn_input_r2_without']:.3f} ->"
            f" {quality[str(l)]['ffn_input_r2']:.3f}, attention output R² {quality[str(l)]['attention_output_r2']:.3f}"
            f" (held-out tokens {int(held.sum())}); maps kept: {used}")
    recipe.pia, recipe.pia_tensors = {"fit_quality": quality}, tensors


def _best_ridge(x, y, held, grid, prior=None):
    """(W, strength, held-out R²) of the grid's strength whose fit on the other tokens predicts the held-out best."""
    best = None
    for strength in grid:
        w = _ridge(x[~held], y[~held], strength, prior)
        r2 = _r2(x[held] @ w, y[held])
        if best is None or r2 > best[2]:
            best = (w, strength, r2)
    return best
