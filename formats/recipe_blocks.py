"""The recipe's sub-blocks (formats/recipe.py): the mixture-of-depths ``mod`` block, the ``pre_llm`` stage, and the
JSON type check of every recipe field. The rules between fields are Recipe.validate's."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pathlib import Path

from mllm_deploy.core.errors import RecipeError

PRE_LLM_METHODS = ("cls", "dart")  # selection before the language model (PreLlmStage)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)



@dataclass(frozen=True)
class ModBlock:
    """The ``mod`` block of a mixture-of-depths recipe (docs/mod.md); JSON keys are the field names."""

    layers: tuple[int, ...]  # routed layers, ascending
    capacity: tuple[float, ...]  # per routed layer, share of the N visual tokens processed
    router: str  # MOD_ROUTERS
    router_input: str = "input_norm"  # MOD_ROUTER_INPUTS
    skip: str = "identity"  # MOD_SKIP_RULES
    selected_scale: str = "none"  # MOD_SELECTED_SCALES
    router_file: str | None = None  # beside the recipe, written by save_recipe
    router_sha256: str | None = None
    tanh_alpha: float | None = None  # TanhNorm's alpha, when a tanh rule is used
    # records of the calibration (in the JSON only when present)
    arank: dict[str, Any] | None = None
    trained_from: dict[str, Any] | None = None
    fit_quality: dict[str, Any] | None = None

    RECORDS = ("arank", "trained_from", "fit_quality")  # not a field: no annotation

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "capacity", tuple(self.capacity))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name in self._present()}
        return {**d, "layers": list(self.layers), "capacity": list(self.capacity)}

    def _present(self) -> set[str]:
        """The JSON keys: every field but the records that are None."""
        return {f.name for f in fields(self) if f.name not in self.RECORDS or getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any], num_layers: int) -> "ModBlock":
        """Field types checked here (a RecipeError naming the field); the rules between fields and the
        visual-token counts are checked by :meth:`Recipe.validate`."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RecipeError(f"recipe mod has unknown keys {', '.join(map(repr, unknown))}; known: {', '.join(sorted(names))}")
        layers, capacity = d.get("layers"), d.get("capacity")
        if not isinstance(layers, list) or not all(_is_int(l) for l in layers):
            raise RecipeError(f"recipe mod.layers must be a non-empty ascending list of layers in 0..{num_layers - 1}")
        if not isinstance(capacity, list) or not all(_is_number(c) for c in capacity):
            raise RecipeError("recipe mod.capacity must list one share per routed layer")
        # router, skip, ... of another type fail validate()'s vocabulary check, by name
        kinds = {"a string": str, "a number": (int, float), "an object": dict}
        expected = {"router_file": "a string", "router_sha256": "a string", "tanh_alpha": "a number",
                    **dict.fromkeys(cls.RECORDS, "an object")}
        for key, what in expected.items():
            value = d.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds[what])):
                raise RecipeError(f"recipe mod.{key} must be {what} or null, got {value!r}")
        # the four rules have no default in a file: a missing one fails validate() by name
        return cls(**{**d, **{k: d.get(k) for k in ("router", "router_input", "skip", "selected_scale")}})


@dataclass(frozen=True)
class PreLlmStage:
    """The ``pre_llm`` block: visual tokens selected in the vision graph, before the projector's output enters
    the language model. ``keep`` of the tower's N tokens stay, in their original order, at contiguous positions."""

    method: str  # PRE_LLM_METHODS
    keep: int
    pivots: int = 0  # dart: pivot tokens (the most salient by L1 norm), each keeping its least-similar tokens
    positions: str = "contiguous"  # the kept tokens are the prompt's visual run, renumbered (FasterVLM, DART)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "keep": self.keep, "pivots": self.pivots, "positions": self.positions}

    @classmethod
    def from_dict(cls, d: Any) -> "PreLlmStage":
        if not isinstance(d, dict):
            raise RecipeError(f"recipe pre_llm must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"method", "keep", "pivots", "positions"})
        if unknown:
            raise RecipeError(f"recipe pre_llm has unknown keys {', '.join(map(repr, unknown))}")
        for key in ("keep", "pivots"):
            if key in d and not _is_int(d[key]):
                raise RecipeError(f"recipe pre_llm.{key} must be an integer, got {d[key]!r}")
        if "keep" not in d:
            raise RecipeError("recipe pre_llm needs 'keep' (visual tokens the language model sees)")
        return cls(method=d.get("method"), keep=d["keep"], pivots=d.get("pivots", 0),
                   positions=d.get("positions", "contiguous"))


def check_field_types(d: dict) -> None:
    """The JSON type of every field the code reads, checked before any is used, so a hand-edited or
    truncated recipe is a :class:`RecipeError` naming the field (never a TypeError later)."""
    model = d.get("model")
    if not isinstance(model, dict):
        raise RecipeError(f"recipe 'model' must be an object, got {type(model).__name__}")
    for key in ("num_layers", "hidden_size", "visual_tokens"):
        if not _is_int(model.get(key)) or model[key] < 1:
            raise RecipeError(f"recipe model.{key} must be a positive integer, got {model.get(key)!r}")
    for key in ("architecture", "fingerprint"):
        if not isinstance(model.get(key), str):
            raise RecipeError(f"recipe model.{key} must be a string, got {model.get(key)!r}")
    if not isinstance(d.get("method"), dict) or not isinstance(d["method"].get("name"), str):
        raise RecipeError("recipe 'method' must be an object with a 'name'")
    tokens = d.get("visual_tokens")
    if not isinstance(tokens, list) or not all(_is_int(v) for v in tokens):
        raise RecipeError("recipe visual_tokens must be a list of integers, one per layer")
    if d.get("final_visual_tokens") is not None and not _is_int(d["final_visual_tokens"]):
        raise RecipeError(f"recipe final_visual_tokens must be an integer, got {d['final_visual_tokens']!r}")
    score = d.get("score", {})
    if not isinstance(score, dict):
        raise RecipeError(f"recipe 'score' must be an object, got {type(score).__name__}")
    for key, value in score.items():
        if key in ("attention_layer_offset", "seed") and not _is_int(value):
            raise RecipeError(f"recipe score.{key} must be an integer, got {value!r}")
        if key in ("query_rows", "head_reduction", "combine") and not isinstance(value, str):
            raise RecipeError(f"recipe score.{key} must be a string, got {value!r}")
    if not isinstance(d.get("prune_stage", ""), str):
        raise RecipeError(f"recipe prune_stage must be a string, got {d['prune_stage']!r}")
    if not isinstance(d.get("skip_attention", []), list):
        raise RecipeError(f"recipe skip_attention must be a list of layers, got {d['skip_attention']!r}")
    for key in ("flops", "mod", "pre_llm", "pia"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise RecipeError(f"recipe '{key}' must be an object, got {type(d[key]).__name__}")
    for key in ("provenance", "extra"):
        if not isinstance(d.get(key, {}), dict):
            raise RecipeError(f"recipe '{key}' must be an object, got {type(d[key]).__name__}")


def validate_pre_llm(self) -> None:  # self: the Recipe
    """The pre_llm stage and DART's in-LLM score against the rest of the recipe (Recipe.validate)."""
    stage, name = self.pre_llm, self.method.get("name")
    in_llm_dart = name == "dart" and self.score.combine == "duplication"
    if name in PRE_LLM_METHODS and stage is None and not in_llm_dart:
        raise RecipeError(f"a {name} recipe needs its 'pre_llm' object (the selection before the language model)")
    if self.score.combine == "duplication":
        if self.prune_stage != "layer_input" or self.score.attention_layer_offset != -1:
            raise RecipeError("score.combine 'duplication' (DART) ranks at a layer's input with the previous"
                              " layer's keys: prune_stage layer_input, attention_layer_offset -1")
        if self.score.pivots < 1 or self.score.text_pivots < 0:
            raise RecipeError("score.combine 'duplication' needs score.pivots >= 1 and score.text_pivots >= 0")
        if len(self.prune_layers) > 1 or any(self.score.pivots > v for v in self.visual_tokens if v):
            raise RecipeError("a duplication (DART) recipe prunes once, keeping at least score.pivots tokens")
    if stage is None:
        return
    if stage.method not in PRE_LLM_METHODS:
        raise RecipeError(f"recipe pre_llm.method {stage.method!r} is not one of {', '.join(PRE_LLM_METHODS)}")
    if name in PRE_LLM_METHODS and name != stage.method:
        raise RecipeError(f"recipe method {name!r} has a pre_llm stage of method {stage.method!r}")
    if not 1 <= stage.keep < self.model.visual_tokens:
        raise RecipeError(f"recipe pre_llm.keep = {stage.keep} must be in 1..{self.model.visual_tokens - 1}"
                          f" (the tower makes {self.model.visual_tokens} visual tokens)")
    if stage.positions != "contiguous":
        raise RecipeError(f"recipe pre_llm.positions {stage.positions!r}: only 'contiguous' (the authors' way)")
    if in_llm_dart:
        raise RecipeError("a dart recipe selects before the language model or inside it, not both")
    if stage.method == "dart" and not 1 <= stage.pivots <= stage.keep:
        raise RecipeError(f"recipe pre_llm.pivots = {stage.pivots} must be in 1..{stage.keep} for dart")
    if stage.method == "cls" and stage.pivots:
        raise RecipeError("recipe pre_llm.pivots applies to dart only")

def validate_skip_attention(self) -> None:  # self: the Recipe
    """EAS's skip_attention and its stand-in against the rest of the recipe (Recipe.validate)."""
    skipped = self.skip_attention
    if not all(_is_int(l) for l in skipped) or skipped != sorted(set(skipped)) or not all(
            0 <= l < self.num_layers for l in skipped):
        raise RecipeError(f"recipe skip_attention must be an ascending list of distinct layers in"
                          f" 0..{self.num_layers - 1}, got {skipped!r}")
    if len(skipped) == self.num_layers:
        raise RecipeError("recipe skip_attention removes every layer's attention: the model would never read"
                          " its prompt")
    if skipped and (self.is_mod or any(v != self.visual_tokens[0] for v in self.visual_tokens)
                    or self.final_visual_tokens not in (None, self.visual_tokens[0])):
        raise RecipeError("recipe skip_attention composes with a pre_llm stage only, not with in-LLM pruning"
                          " or mixture-of-depths (their rankings read attention)")
    if self.pia is not None:
        if not skipped:
            raise RecipeError("recipe pia needs skip_attention (it stands in for removed attention)")
        if not isinstance(self.pia, dict) or (self.pia_tensors is None and not isinstance(self.pia.get("file"), str)):
            raise RecipeError("recipe pia must be an object naming its tensor file ('file') beside the recipe")
        name = self.pia.get("file")
        if name is not None and (not isinstance(name, str) or Path(name).name != name):
            raise RecipeError(f"recipe pia.file {name!r} must be a file name beside the recipe")
    if self.method.get("name") == "eas" and not skipped:
        raise RecipeError("an eas recipe needs skip_attention (the layers whose attention is removed)")
