"""The recipe (``recipe.json``, schema ``mllm-deploy/recipe@1``): static, per model.

``visual_tokens[l]`` is the number of visual tokens entering layer ``l``'s attention, so layer
``l`` caches ``text + visual_tokens[l]`` entries. A method prunes at one of two points:

- ``layer_input``: rows are dropped before layer ``l`` runs (FastV, PyramidDrop, VTW); layer
  ``l``'s attention and MLP both see ``visual_tokens[l]`` tokens;
- ``after_attention``: rows are dropped inside layer ``l`` after its attention, before o_proj
  (FitPrune); layer ``l``'s KV holds ``visual_tokens[l]`` tokens, its o_proj and MLP see
  ``visual_tokens[l+1]`` (``final_visual_tokens`` after the last layer).

``prune_layers`` lists the layers where a selection happens; ``score`` says how tokens are
ranked there. This module imports nothing heavy: the runtime and flops-mllm read recipes too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mllm_deploy.core.errors import RecipeError

RECIPE_SCHEMA = "mllm-deploy/recipe@1"
METHODS = ("dense", "fastv", "pdrop", "vtw", "fitprune", "mod")
PRUNE_STAGES = ("layer_input", "after_attention")
QUERY_ROWS = ("last_text", "text", "visual_and_text")
HEAD_REDUCTIONS = ("mean", "max")
COMBINES = ("single", "self_times_cross", "random")


@dataclass(frozen=True)
class ScoreSpec:
    """How visual tokens are ranked at a pruning layer."""

    query_rows: str = "last_text"  # which query rows attend to the visual keys
    head_reduction: str = "mean"
    combine: str = "single"  # FitPrune ranks by self-attention mass x cross-attention mass
    attention_layer_offset: int = 0  # -1: rank with the previous layer's attention (FastV)
    seed: int = 0  # combine="random": the baseline that keeps a fixed random subset per layer


@dataclass(frozen=True)
class ModelRef:
    architecture: str
    num_layers: int
    hidden_size: int
    visual_tokens: int
    fingerprint: str


@dataclass
class Recipe:
    model: ModelRef
    method: dict[str, Any]  # {"name": ..., **parameters}
    visual_tokens: list[int]
    prune_stage: str = "layer_input"
    final_visual_tokens: int | None = None  # after the last layer (after_attention methods)
    score: ScoreSpec = field(default_factory=ScoreSpec)
    positions: str = "original"  # pruned tokens keep their position ids
    mod: dict[str, Any] | None = None
    flops: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific records (KL curve, alpha, ...)

    # ---- derived views ----------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def num_layers(self) -> int:
        return len(self.visual_tokens)

    def mlp_visual_tokens(self) -> list[int]:
        """Visual tokens seen by o_proj and the MLP of each layer."""
        if self.prune_stage == "layer_input":
            return list(self.visual_tokens)
        final = self.visual_tokens[-1] if self.final_visual_tokens is None else self.final_visual_tokens
        return list(self.visual_tokens[1:]) + [final]

    @property
    def prune_layers(self) -> list[int]:
        """Layers at which a selection happens."""
        if self.prune_stage == "layer_input":
            previous = [self.model.visual_tokens] + self.visual_tokens[:-1]
            return [l for l, (a, b) in enumerate(zip(previous, self.visual_tokens)) if b < a]
        mlp = self.mlp_visual_tokens()
        return [l for l in range(self.num_layers) if mlp[l] < self.visual_tokens[l]]

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"schema": RECIPE_SCHEMA, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe is a JSON object, got {type(d).__name__}")
        if d.get("schema") != RECIPE_SCHEMA:
            raise RecipeError(f"recipe schema is {d.get('schema')!r}, expected {RECIPE_SCHEMA!r}")
        try:
            model = ModelRef(**d["model"])
            score = ScoreSpec(**d.get("score", {}))
            recipe = cls(
                model=model,
                method=dict(d["method"]),
                visual_tokens=[int(v) for v in d["visual_tokens"]],
                prune_stage=d.get("prune_stage", "layer_input"),
                final_visual_tokens=d.get("final_visual_tokens"),
                score=score,
                positions=d.get("positions", "original"),
                mod=d.get("mod"),
                flops=d.get("flops"),
                provenance=dict(d.get("provenance", {})),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(f"recipe is malformed: {type(exc).__name__}: {exc}") from None
        recipe.validate()
        return recipe

    def validate(self) -> None:
        name = self.method.get("name") if isinstance(self.method, dict) else None
        if name not in METHODS:
            raise RecipeError(f"recipe method {name!r} is not one of {', '.join(METHODS)}")
        if self.prune_stage not in PRUNE_STAGES:
            raise RecipeError(f"recipe prune_stage {self.prune_stage!r} is not one of {', '.join(PRUNE_STAGES)}")
        for attr, allowed in (("query_rows", QUERY_ROWS), ("head_reduction", HEAD_REDUCTIONS), ("combine", COMBINES)):
            if getattr(self.score, attr) not in allowed:
                raise RecipeError(f"recipe score.{attr} {getattr(self.score, attr)!r} is not one of {', '.join(allowed)}")
        if len(self.visual_tokens) != self.model.num_layers:
            raise RecipeError(
                f"recipe visual_tokens has {len(self.visual_tokens)} entries for a model of {self.model.num_layers} layers"
            )
        limit = self.model.visual_tokens
        for l, n in enumerate(self.visual_tokens + ([self.final_visual_tokens] if self.final_visual_tokens is not None else [])):
            if not 0 <= n <= limit:
                raise RecipeError(f"recipe visual_tokens[{l}] = {n} is outside 0..{limit}")
        if name != "mod" and any(b > a for a, b in zip(self.visual_tokens, self.visual_tokens[1:])):
            raise RecipeError("recipe visual_tokens must be non-increasing for pruning methods")

    def check_model(self, spec) -> None:
        """Refuse a recipe made for another model, naming the mismatching field."""
        expected = {
            "fingerprint": spec.fingerprint,
            "num_layers": spec.text.num_layers,
            "hidden_size": spec.text.hidden_size,
            "visual_tokens": spec.visual_tokens,
        }
        for key, value in expected.items():
            have = getattr(self.model, key)
            if have != value:
                raise RecipeError(f"recipe does not match the model: model.{key} is {have!r} in the recipe, {value!r} in the model")


def random_scores(seed: int, layer: int, n_vis: int):
    """Scores of the random-selection baseline: fixed per (seed, layer), the same for every image,
    so the reference and the exported graph keep the same tokens."""
    import numpy as np

    return np.random.default_rng([seed, layer]).random(n_vis).astype(np.float32)


def model_ref(spec) -> ModelRef:
    return ModelRef(
        architecture=spec.architecture,
        num_layers=spec.text.num_layers,
        hidden_size=spec.text.hidden_size,
        visual_tokens=spec.visual_tokens,
        fingerprint=spec.fingerprint,
    )


def dense_recipe(spec) -> Recipe:
    return Recipe(model=model_ref(spec), method={"name": "dense"}, visual_tokens=[spec.visual_tokens] * spec.text.num_layers)


def load_recipe(path: str | Path, spec=None) -> Recipe:
    from mllm_deploy.core.jsonio import read_json

    recipe = Recipe.from_dict(read_json(path, RecipeError, "recipe file"))
    if spec is not None:
        recipe.check_model(spec)
    return recipe
