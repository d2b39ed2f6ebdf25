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

Mixture-of-depths (``method.name == "mod"``, docs/mod.md) is not pruning: a visual token a MoD
layer skips stays in the sequence and later layers may process it again. ``visual_tokens[l]`` is
then the number of visual tokens layer ``l`` *processes* (its capacity; ``N`` for dense layers),
so it need not be monotonic, and the ``mod`` block (:class:`ModBlock`) names the routed layers, the
router and the skipped-token rule. Routers with weights live in a safetensors file next to the recipe
(``mod.router_file``, its sha256 in ``mod.router_sha256``), written by :func:`save_recipe`.

Two more stages compose with any of the above (``docs/pre_llm_and_eas.md``):

- ``pre_llm`` (:class:`PreLlmStage`): visual tokens chosen *before* the language model, in the vision graph
  (FasterVLM's [CLS] attention, DART's duplication at the embedding level). The language model then sees
  ``pre_llm.keep`` visual tokens at contiguous positions, as the authors' code feeds them, and ``visual_tokens``
  counts within those (:attr:`Recipe.llm_visual_tokens`; :meth:`Recipe.llm_recipe` is the in-LLM part alone).
- ``skip_attention`` (EAS): layers whose multi-head attention is removed (the FFN stays); they hold no KV cache.
  ``pia`` records the training-free stand-in for the removed attention folded into those layers' FFN weights
  (its tensors in a safetensors file beside the recipe, like MoD routers).

``method`` stays an object: its name (:attr:`Recipe.method_name`, :attr:`Recipe.is_mod`) and the
method's parameters, a record for people that no code branches on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mllm_deploy.core.errors import RecipeError
from mllm_deploy.formats.recipe_blocks import (  # noqa: F401 - re-exported
    PRE_LLM_METHODS, ModBlock, PreLlmStage, _is_int, _is_number, check_field_types, validate_pre_llm,
    validate_skip_attention)
from mllm_deploy.formats.routers import MOD_ROUTER_INPUTS, MOD_SELECTED_SCALES  # noqa: F401 - part of the vocabulary

RECIPE_SCHEMA = "mllm-deploy/recipe@1"
METHODS = ("dense", "fastv", "pdrop", "vtw", "fitprune", "mod", "cls", "dart", "eas")
PRUNE_STAGES = ("layer_input", "after_attention")
QUERY_ROWS = ("last_text", "text", "visual_and_text")
HEAD_REDUCTIONS = ("mean", "max")
COMBINES = ("single", "self_times_cross", "random", "duplication")  # duplication: DART inside the LLM
# Mixture-of-depths (docs/mod.md)
MOD_ROUTERS = ("trained", "fitted", "attention")
MOD_SKIP_RULES = ("identity", "tanh_scale")  # skipped visual tokens: unchanged (gamma-MoD) or w*x (p-MoD)


@dataclass(frozen=True)
class ScoreSpec:
    """How visual tokens are ranked at a pruning layer."""

    query_rows: str = "last_text"  # which query rows attend to the visual keys
    head_reduction: str = "mean"
    combine: str = "single"  # FitPrune ranks by self-attention mass x cross-attention mass
    attention_layer_offset: int = 0  # -1: rank with the previous layer's attention (FastV)
    seed: int = 0  # combine="random": the baseline that keeps a fixed random subset per layer
    # combine="duplication" (DART in the LLM, docs/pre_llm_and_eas.md): pivots among the visual tokens and the text
    # after the image, by the L1 norm of the previous layer's keys
    pivots: int = 0
    text_pivots: int = 0


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
    mod: ModBlock | None = None
    pre_llm: PreLlmStage | None = None
    skip_attention: list[int] = field(default_factory=list)  # EAS: layers without multi-head attention
    pia: dict[str, Any] | None = None  # EAS stand-in: {"file", "sha256", "fit_quality"} (tensors beside the recipe)
    flops: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific records (KL curve, alpha, ...)
    # Not serialised: where the recipe was read from (its router file resolves there) and, for a MoD
    # recipe fresh from calibration, its router tensors before save_recipe writes them.
    base_dir: Path | None = field(default=None, repr=False, compare=False, metadata={"serialise": False})
    routers: dict[str, Any] | None = field(default=None, repr=False, compare=False, metadata={"serialise": False})
    pia_tensors: dict[str, Any] | None = field(default=None, repr=False, compare=False,
                                               metadata={"serialise": False})

    # ---- derived views ----------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def num_layers(self) -> int:
        return len(self.visual_tokens)

    @property
    def is_mod(self) -> bool:
        return self.method.get("name") == "mod"

    @property
    def llm_visual_tokens(self) -> int:
        """Visual tokens entering the language model: the tower's, or ``pre_llm.keep``."""
        return self.model.visual_tokens if self.pre_llm is None else self.pre_llm.keep

    def llm_recipe(self) -> "Recipe":
        """The in-LLM part alone, for a model whose prompt holds ``llm_visual_tokens`` visual tokens: what the
        prefill builders, the FLOPs plan and the layer-by-layer reference work on."""
        if self.pre_llm is None:
            return self
        return replace(self, model=replace(self.model, visual_tokens=self.pre_llm.keep), pre_llm=None)

    def llm_spec(self, spec):
        """``spec`` as the language model sees it under this recipe (fewer visual tokens after a pre_llm stage)."""
        return spec if self.pre_llm is None else replace(spec, llm_visual_tokens=self.pre_llm.keep)

    @property
    def mod_layers(self) -> list[int]:
        """Routed (mixture-of-depths) layers; empty for other methods."""
        return list(self.mod.layers) if self.is_mod and self.mod is not None else []

    def mlp_visual_tokens(self) -> list[int]:
        """Visual tokens seen by o_proj and the MLP of each layer."""
        if self.prune_stage == "layer_input":
            return list(self.visual_tokens)
        final = self.visual_tokens[-1] if self.final_visual_tokens is None else self.final_visual_tokens
        return list(self.visual_tokens[1:]) + [final]

    @property
    def prune_layers(self) -> list[int]:
        """Layers at which a selection happens."""
        if self.is_mod:
            return self.mod_layers
        if self.prune_stage == "layer_input":
            previous = [self.llm_visual_tokens] + self.visual_tokens[:-1]
            return [l for l, (a, b) in enumerate(zip(previous, self.visual_tokens)) if b < a]
        mlp = self.mlp_visual_tokens()
        return [l for l in range(self.num_layers) if mlp[l] < self.visual_tokens[l]]

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("serialise", True)}
        d = {k: asdict(v) if k in ("model", "score") else v for k, v in d.items()}
        d["mod"] = self.mod.to_dict() if self.mod is not None else None
        d["pre_llm"] = self.pre_llm.to_dict() if self.pre_llm is not None else None
        d = {k: v if k in ("model", "score") else json.loads(json.dumps(v)) for k, v in d.items()}
        return {"schema": RECIPE_SCHEMA, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Any, base_dir: str | Path | None = None) -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe is a JSON object, got {type(d).__name__}")
        if d.get("schema") != RECIPE_SCHEMA:
            raise RecipeError(f"recipe schema is {d.get('schema')!r}, expected {RECIPE_SCHEMA!r}")
        check_field_types(d)
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
                mod=ModBlock.from_dict(d["mod"], model.num_layers) if d.get("mod") is not None else None,
                pre_llm=PreLlmStage.from_dict(d["pre_llm"]) if d.get("pre_llm") is not None else None,
                skip_attention=list(d.get("skip_attention", [])),
                pia=d.get("pia"),
                flops=d.get("flops"),
                provenance=dict(d.get("provenance", {})),
                extra=dict(d.get("extra", {})),
                base_dir=Path(base_dir) if base_dir is not None else None,
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
        self._validate_pre_llm()
        self._validate_skip_attention()
        limit = self.llm_visual_tokens
        for l, n in enumerate(self.visual_tokens + ([self.final_visual_tokens] if self.final_visual_tokens is not None else [])):
            if not 0 <= n <= limit:
                raise RecipeError(f"recipe visual_tokens[{l}] = {n} is outside 0..{limit}")
        if name != "mod" and any(b > a for a, b in zip(self.visual_tokens, self.visual_tokens[1:])):
            raise RecipeError("recipe visual_tokens must be non-increasing for pruning methods")
        if name == "mod":
            self._validate_mod()
        elif self.mod is not None:
            raise RecipeError(f"recipe has a 'mod' block but method {name!r}; only method 'mod' routes layers")

    def _validate_pre_llm(self) -> None:
        validate_pre_llm(self)

    def _validate_skip_attention(self) -> None:
        validate_skip_attention(self)

    @property
    def attention_layers(self) -> list[int]:
        """Layers that keep their attention (and a KV cache)."""
        return [l for l in range(self.num_layers) if l not in set(self.skip_attention)]

    def pia_path(self) -> Path | None:
        if not self.pia or not self.pia.get("file"):
            return None
        return (self.base_dir or Path(".")) / self.pia["file"]

    def _validate_mod(self) -> None:
        mod, limit = self.mod, self.llm_visual_tokens
        if not isinstance(mod, ModBlock):
            raise RecipeError("a mod recipe needs a 'mod' object (routed layers, router, skip rule)")
        if self.prune_stage != "layer_input" or self.final_visual_tokens is not None:
            raise RecipeError("a mod recipe routes at each layer's input (prune_stage layer_input, no final_visual_tokens)")
        for key, allowed in (("router", MOD_ROUTERS), ("skip", MOD_SKIP_RULES),
                             ("selected_scale", MOD_SELECTED_SCALES), ("router_input", MOD_ROUTER_INPUTS)):
            if getattr(mod, key) not in allowed:
                raise RecipeError(f"recipe mod.{key} {getattr(mod, key)!r} is not one of {', '.join(allowed)}")
        layers = list(mod.layers)
        if not layers or layers != sorted(set(layers)) or not all(_is_int(l) and 0 <= l < self.num_layers for l in layers):
            raise RecipeError(f"recipe mod.layers must be a non-empty ascending list of layers in 0..{self.num_layers - 1}")
        if len(mod.capacity) != len(layers):
            raise RecipeError("recipe mod.capacity must list one share per routed layer")
        for l, n in enumerate(self.visual_tokens):
            routed = l in layers
            if routed and not 0 < n < limit:
                raise RecipeError(f"recipe routes layer {l} but its capacity visual_tokens[{l}] = {n} is not in 1..{limit - 1}")
            if not routed and n != limit:
                raise RecipeError(f"recipe visual_tokens[{l}] = {n}: a layer mod does not route processes all {limit}")
        if mod.router == "attention":
            if layers[0] == 0:
                raise RecipeError("the attention router ranks with the previous layer's attention: layer 0 cannot be routed")
            if mod.router_file or mod.skip != "identity" or mod.selected_scale != "none":
                raise RecipeError("the attention router has no weights: no router_file, skip identity, selected_scale none")
        elif self.routers is None and not mod.router_file:
            raise RecipeError(f"recipe mod.router {mod.router!r} needs mod.router_file (the router weights)")
        if mod.router_file and (not isinstance(mod.router_file, str) or Path(mod.router_file).name != mod.router_file):
            raise RecipeError(f"recipe mod.router_file {mod.router_file!r} must be a file name beside the recipe")
        if mod.skip == "tanh_scale" or mod.selected_scale == "tanh_norm":
            if not _is_number(mod.tanh_alpha):
                raise RecipeError("recipe mod.tanh_alpha must be a number when a TanhNorm rule is used")

    def router_path(self) -> Path | None:
        """Where the router file of a MoD recipe is (relative to the recipe's directory)."""
        if not self.is_mod or self.mod is None or not self.mod.router_file:
            return None
        name = Path(self.mod.router_file)
        return (self.base_dir or Path(".")) / name

    def check_model(self, spec) -> None:
        """Refuse a recipe made for another model, naming the mismatching field."""
        expected = {
            "fingerprint": spec.fingerprint,
            "num_layers": spec.text.num_layers,
            "hidden_size": spec.text.hidden_size,
            "visual_tokens": spec.tower_visual_tokens,
        }
        for key, value in expected.items():
            have = getattr(self.model, key)
            if have != value and key == "fingerprint":  # hashes say nothing to a reader: say what they stand for
                raise RecipeError(
                    f"recipe does not match the model: it was calibrated for a model of another geometry (recipe"
                    f" model.fingerprint {str(have)[:12]}..., this model's {value[:12]}...: heads, sizes, RoPE or"
                    " vocabulary differ); calibrate a recipe for this model with calib-mllm")
            if have != value:
                raise RecipeError(f"recipe does not match the model: model.{key} is {have!r} in the recipe, {value!r} in the model")


def random_scores(seed: int, layer: int, n_vis: int):
    """Scores of the random-selection baseline: fixed per (seed, layer), the same for every image,
    so the reference and the exported graph keep the same tokens."""
    import numpy as np

    return np.random.default_rng([seed, layer]).random(n_vis).astype(np.float32)


def model_ref(spec) -> ModelRef:
    return ModelRef(architecture=spec.architecture, num_layers=spec.text.num_layers, hidden_size=spec.text.hidden_size,
                    visual_tokens=spec.visual_tokens, fingerprint=spec.fingerprint)


def dense_recipe(spec) -> Recipe:
    return Recipe(model=model_ref(spec), method={"name": "dense"}, visual_tokens=[spec.visual_tokens] * spec.text.num_layers)


def load_recipe(path: str | Path, spec=None) -> Recipe:
    from mllm_deploy.core.jsonio import read_json

    recipe = Recipe.from_dict(read_json(path, RecipeError, "recipe file"), base_dir=Path(path).resolve().parent)
    if spec is not None:
        recipe.check_model(spec)
    return recipe


def router_file_name(recipe_path: str | Path) -> str:
    """The router file written beside ``recipe_path``: ``<stem>.routers.safetensors``."""
    return f"{Path(recipe_path).stem}.routers.safetensors"


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write ``recipe.json`` atomically; a MoD recipe holding router tensors gets its router file
    (``<stem>.routers.safetensors``, sha256 recorded in the recipe) written first, beside it."""
    import hashlib

    from mllm_deploy.core.fsutil import atomic_write_bytes, atomic_write_text

    path = Path(path)
    if recipe.is_mod and recipe.routers is not None:
        from mllm_deploy.formats.routers import router_file_bytes  # safetensors, only when routers are written

        data = router_file_bytes(recipe.routers)
        recipe.mod = replace(recipe.mod, router_file=router_file_name(path),
                             router_sha256=hashlib.sha256(data).hexdigest())
        atomic_write_bytes(path.parent / router_file_name(path), data)
    if recipe.pia is not None and recipe.pia_tensors is not None:
        from mllm_deploy.formats.routers import router_file_bytes

        data = router_file_bytes(recipe.pia_tensors)
        name = f"{path.stem}.pia.safetensors"
        recipe.pia = {**recipe.pia, "file": name, "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_bytes(path.parent / name, data)
    recipe.base_dir = path.resolve().parent
    atomic_write_text(path, recipe.to_json())
