"""calib-mllm --method cls | dart: visual tokens chosen before the language model (recipe ``pre_llm``), and the
PyTorch reference of that selection (what the vision graph of export/pre_llm.py must reproduce token for token).

- ``cls`` (FasterVLM, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning"): the attention the
  vision tower's [CLS] query pays each patch, heads averaged, in the last tower layer whose output LLaVA uses
  (``vision_feature_layer``: the penultimate layer for LLaVA-1.5, the attention the authors' code reads); the
  top ``keep`` patches stay in their original order.
- ``dart`` (DART, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More") at
  the embedding level by default, where TensorRT Edge-LLM applies it: pivots are the projected visual tokens with
  the largest L1 norm; each pivot in turn keeps the tokens least similar to it (cosine) among those left. Before
  the LLM there is no text, so every pivot is visual (default 8 = the authors' 4 visual + 4 text). With
  ``--dart-layer L`` it is the authors' in-LLM form instead (an in-LLM recipe, ``score.combine="duplication"``):
  4 visual + 4 text pivots by the L1 norm of layer L-1's keys, original positions. Either way the budget is met
  exactly (``dart_quota``) so that every TopK has a constant k.

Neither needs calibration data: the recipe is the budget. Positions before the LLM: the kept tokens are the
prompt's visual run, at contiguous positions, as both authors' code feeds them to the language model.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm_deploy.calib.common import CalibRun, CommonOptions, option
from mllm_deploy.core.errors import RecipeError
from mllm_deploy.formats.recipe import PreLlmStage, Recipe, model_ref

DEFAULT_RATIO = 0.5
DEFAULT_PIVOTS = 8
DEFAULT_LLM_PIVOTS = 4  # the authors' LLaVA setting: 4 visual and 4 text pivots


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
    pivots: int | None = option(None, "--pivots",
                                f"dart: visual pivot tokens (default {DEFAULT_PIVOTS} before the language model,"
                                f" {DEFAULT_LLM_PIVOTS} inside it)", int)
    text_pivots: int = option(DEFAULT_LLM_PIVOTS, "--text-pivots",
                              f"dart inside the language model: text pivot tokens (default {DEFAULT_LLM_PIVOTS})", int)
    dart_layer: str = option("embedding", "--dart-layer",
                             "dart: 'embedding' (before the language model, default) or a decoder layer L (at its"
                             " input, as the authors' code at L=2)", _layer_spec)

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
        return dart_in_llm_recipe(run.spec, options)
    n = run.spec.tower().visual_tokens
    keep = keep_count(n, options.keep, options.ratio)
    pivots = DEFAULT_PIVOTS if options.pivots is None else options.pivots
    if not 1 <= pivots <= keep:
        raise RecipeError(f"--pivots must be in 1..{keep} (the tokens kept), got {pivots}")
    return pre_llm_recipe(run.spec, PreLlmStage("dart", keep, pivots=pivots),
                          {"keep": keep, "ratio": round(1 - keep / n, 6), "pivots": pivots,
                           "layer": "embedding", "similarity": "cosine of projected features"})


def dart_in_llm_recipe(spec, options: DartOptions) -> Recipe:
    """DART at decoder layer L's input (layers < L see every visual token), original positions, as the authors'."""
    from mllm_deploy.formats.recipe import ScoreSpec

    layer, layers, n = options.dart_layer, spec.text.num_layers, spec.visual_tokens
    if not 1 <= layer < layers:
        raise RecipeError(f"--dart-layer must be 'embedding' or a layer in 1..{layers - 1}, got {layer}")
    keep = keep_count(n, options.keep, options.ratio)
    pivots = DEFAULT_LLM_PIVOTS if options.pivots is None else options.pivots
    if not 1 <= pivots <= keep or options.text_pivots < 0:
        raise RecipeError(f"--pivots must be in 1..{keep} and --text-pivots 0 or more, got {pivots} and"
                          f" {options.text_pivots}")
    return Recipe(model=model_ref(spec), visual_tokens=[n] * layer + [keep] * (layers - layer),
                  method={"name": "dart", "keep": keep, "ratio": round(1 - keep / n, 6), "layer": layer,
                          "pivots": pivots, "text_pivots": options.text_pivots,
                          "similarity": "cosine of the layer input after the final norm"},
                  score=ScoreSpec(query_rows="last_text", combine="duplication", attention_layer_offset=-1,
                                  pivots=pivots, text_pivots=options.text_pivots))
