"""calib-mllm --method cls | dart: visual tokens chosen before the language model (recipe ``pre_llm``), and the
PyTorch reference of that selection (what the vision graph of export/pre_llm.py must reproduce token for token).

- ``cls`` (FasterVLM, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning"): the attention the
  vision tower's [CLS] query pays each patch, heads averaged, in the last tower layer whose output LLaVA uses
  (``vision_feature_layer``: the penultimate layer for LLaVA-1.5, the attention the authors' code reads); the
  top ``keep`` patches stay in their original order.
- ``dart`` (DART, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More") at
  the embedding level, where TensorRT Edge-LLM applies it: pivots are the projected visual tokens with the
  largest L1 norm; each pivot in turn keeps the tokens least similar to it (cosine) among those left. The authors'
  in-LLM form ranks keys of layer K-1 and also takes text pivots; before the LLM there is no text, so every pivot
  is visual (default 8 = the authors' 4 visual + 4 text), and the budget is met exactly (``dart_quota``) so that
  every TopK has a constant k.

Neither needs calibration data: the recipe is the budget. Positions: the kept tokens are the prompt's visual run,
at contiguous positions, as both authors' code feeds them to the language model.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm_deploy.calib.common import CalibRun, CommonOptions, option
from mllm_deploy.core.errors import RecipeError
from mllm_deploy.formats.recipe import PreLlmStage, Recipe, model_ref

DEFAULT_RATIO = 0.5
DEFAULT_PIVOTS = 8


def _layer_spec(text: str):
    return text if text == "embedding" else int(text)


@dataclass(frozen=True)
class ClsOptions(CommonOptions):
    keep: int | None = option(None, "--keep", "visual tokens the language model keeps (cls, dart)", int)
    ratio: float | None = option(None, "--ratio",
                                 f"share of visual tokens removed before the language model (cls, dart; default"
                                 f" {DEFAULT_RATIO})", float)

    method = cli_group = "cls"


@dataclass(frozen=True)
class DartOptions(ClsOptions):
    pivots: int = option(DEFAULT_PIVOTS, "--pivots", f"dart: pivot tokens (default {DEFAULT_PIVOTS})", int)
    dart_layer: str = option("embedding", "--dart-layer",
                             "dart: where it selects; 'embedding' (before the language model) is what is built",
                             _layer_spec)

    method = cli_group = "dart"


def keep_count(n: int, keep: int | None, ratio: float | None) -> int:
    if keep is not None and ratio is not None:
        raise RecipeError("give --keep or --ratio, not both")
    if keep is None:
        ratio = DEFAULT_RATIO if ratio is None else ratio
        if not 0.0 < ratio < 1.0:
            raise RecipeError(f"--ratio must be in (0, 1), got {ratio}")
        keep = int(round(n * (1.0 - ratio)))
    if not 1 <= keep < n:
        raise RecipeError(f"--keep must be in 1..{n - 1} (the tower makes {n} visual tokens), got {keep}")
    return keep


def pre_llm_recipe(spec, stage: PreLlmStage, parameters: dict) -> Recipe:
    spec = spec.tower()
    if spec.vision_feature_select_strategy != "default":
        raise RecipeError(f"{stage.method} ranks patch tokens: it needs vision_feature_select_strategy 'default',"
                          f" this model uses {spec.vision_feature_select_strategy!r}")
    recipe = Recipe(model=model_ref(spec), method={"name": stage.method, **parameters},
                    visual_tokens=[stage.keep] * spec.text.num_layers, pre_llm=stage)
    recipe.validate()
    return recipe


def calibrate_cls(options: ClsOptions, run: CalibRun) -> Recipe:
    n = run.spec.tower().visual_tokens
    keep = keep_count(n, options.keep, options.ratio)
    return pre_llm_recipe(run.spec, PreLlmStage("cls", keep), {"keep": keep, "ratio": round(1 - keep / n, 6),
                                                                "score": "[CLS] attention, heads averaged"})


def calibrate_dart(options: DartOptions, run: CalibRun) -> Recipe:
    if options.dart_layer != "embedding":
        raise RecipeError(f"--dart-layer {options.dart_layer}: DART inside the language model is not built yet; use"
                          " --dart-layer embedding (before the language model, as TensorRT Edge-LLM applies it)")
    n = run.spec.tower().visual_tokens
    keep = keep_count(n, options.keep, options.ratio)
    if not 1 <= options.pivots <= keep:
        raise RecipeError(f"--pivots must be in 1..{keep} (the tokens kept), got {options.pivots}")
    return pre_llm_recipe(run.spec, PreLlmStage("dart", keep, pivots=options.pivots),
                          {"keep": keep, "ratio": round(1 - keep / n, 6), "pivots": options.pivots,
                           "layer": "embedding", "similarity": "cosine of projected features"})
