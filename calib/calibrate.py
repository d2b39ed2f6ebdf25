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


def calibrate(model: str, options: CommonOptions, log=print) -> Recipe:
    """``options``: the options dataclass of one registered method (``FastVOptions(k=2)``, ...)."""
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.models.registry import load_spec

    method = methods.method_of(options)
    started = time.perf_counter()
    model_dir, spec = load_spec(model)
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


def CalibOptions(method: str, **flat) -> CommonOptions:  # noqa: N802 - stands in for the old class
    """Deprecated: the old flat option bag (``fastv_k=...``, ``mod_plan=...``) mapped onto the method's
    options dataclass. Kept for tools/demo.py and benchmarks/ until they build typed options."""
    unknown = [k for k in flat if not _legacy_known(k)]
    if unknown:
        raise TypeError(f"CalibOptions() got unexpected keyword arguments {unknown}")
    return methods.options_from_flags(method, {k.removeprefix("mod_"): v for k, v in flat.items()})


def _legacy_known(name: str) -> bool:
    return any(name.removeprefix("mod_") in methods.flag_dests(methods.options_class(m)) for m in methods.names())
