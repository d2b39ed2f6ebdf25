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
    recipe = method.calibrate(options, run)
    if options.random_selection:
        if recipe.method_name in ("dense", "mod"):
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
