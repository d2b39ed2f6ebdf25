"""calib-mllm's work: model + a method's options -> Recipe, with provenance and FLOPs.

The method comes from the options' type (calib/methods.py); what is done here is what every method
shares: the model's geometry, the random-selection baseline, the FLOPs figures and the provenance.
"""

from __future__ import annotations

import time
from dataclasses import replace

from mllm_deploy import __version__
from mllm_deploy.calib import methods
from mllm_deploy.calib.common import CalibRun, CommonOptions
from mllm_deploy.core.errors import MllmError
from mllm_deploy.formats.recipe import Recipe


def calibrate(model: str, options: CommonOptions, log=print, cache_dir: str | None = None) -> Recipe:
    """``options``: the options dataclass of one registered method (``FastVOptions(k=2)``, ...); ``cache_dir``:
    the Hugging Face cache to look a ``model`` id up in (None: HF_HUB_CACHE / HF_HOME)."""
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.models.registry import load_spec

    method = methods.method_of(options)
    started = time.perf_counter()
    model_dir, spec = load_spec(model, cache_dir)
    run = CalibRun(model_dir, spec, log, {"tool": f"mllm-deploy {__version__}", "seed": options.seed})
    pre = _pre_llm_stage(options, spec, method.name)
    if pre is not None:  # the in-LLM method sees the model as the pre-LLM stage leaves it
        run.spec, run.pre_llm = pre.llm_spec(spec), pre.pre_llm
        run.provenance["pre_llm_recipe"] = str(options.pre_llm)
    recipe = method.calibrate(options, run)
    if pre is not None:
        recipe.model = replace(recipe.model, visual_tokens=spec.visual_tokens)
        recipe.pre_llm = pre.pre_llm
        recipe.method = {**recipe.method, "pre_llm": pre.method}
    if options.random_selection:
        if recipe.method_name in ("dense", "mod", "cls", "dart", "eas"):
            raise MllmError(f"--random-selection needs a pruning method, not {recipe.method_name}")
        recipe.score = replace(recipe.score, combine="random", seed=options.seed)
        recipe.method = {**recipe.method, "selection": "random"}
    dense = prefill_cost(spec, None, options.text_tokens, "exact")
    pruned = prefill_cost(spec, recipe, options.text_tokens, "exact")
    recipe.flops = {"formula": "exact", "text_tokens": options.text_tokens, "dense": dense.dense,
                    "recipe": pruned.recipe, "reduction": pruned.reduction}
    provenance = run.provenance
    seconds = time.perf_counter() - started
    provenance["seconds"] = round(seconds, 3)
    if "samples" in provenance:
        provenance["seconds_per_sample"] = round(seconds / provenance["samples"], 4)
    recipe.provenance = provenance
    recipe.validate()
    return recipe


def _pre_llm_stage(options: CommonOptions, spec, method: str) -> Recipe | None:
    """The cls/dart recipe --pre-llm names (checked against the model), or None."""
    if options.pre_llm is None:
        return None
    from mllm_deploy.formats.recipe import PRE_LLM_METHODS, load_recipe

    if method in PRE_LLM_METHODS:
        raise MllmError(f"--pre-llm composes a pre-LLM stage with an in-LLM method; --method {method} is itself one")
    pre = load_recipe(options.pre_llm, spec)
    if pre.method_name not in PRE_LLM_METHODS:
        raise MllmError(f"--pre-llm {options.pre_llm} is a {pre.method_name} recipe; it must be a cls or dart recipe")
    return pre
