"""The FLOPs model: prefill cost of a model and a recipe, from ``config.json`` alone.

Three formulas, registered by name so that more can be added:

- ``exact``: every matrix product the exported prefill graph performs (FLOPs = 2 x
  multiply-adds). A test checks it against the MatMul shapes of a real ``prefill.onnx``.
  A mixture-of-depths layer counts at the tokens it processes (text + its capacity), plus its
  router's product (d x 1 over the visual tokens) or, for the attention router, the ranking
  rows of the layer before it.
- ``fastv-eq5``: the FastV paper's Eq. 5, to compare with its published reductions.
- ``fitprune-macs``: the MACs model of FitPrune's code (visual tokens only), to compare with
  its budgets.

Norms, softmax and elementwise ops are not matrix products and are not counted; the vision
tower and projector are not part of the prefill graph either. A recipe's ``pre_llm`` stage (cls, dart) shows
as fewer visual tokens in every layer (its own ranking: DART's pivot similarities, 2·pivots·N·d, counted in
``exact``; the projector it spares for cls is not); ``skip_attention`` layers (EAS) count their MLP only. Nothing heavy is imported:
flops-mllm runs on a machine with no torch.

A LLaVA-NeXT spec makes as many visual tokens as its image does (``ModelSpec.tower_visual_tokens``: the largest
bucket's unless ``for_bucket``/``with_image_tokens`` chose another), and both the dense baseline and a recipe, which
counts tokens for that one image size, are costed at that count; its newline tokens count as visual tokens.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

from mllm_deploy.formats.recipe import Recipe
from mllm_deploy.core.errors import MllmError, RecipeError
from mllm_deploy.formats.geometry import ModelSpec


@dataclass(frozen=True)
class TokenPlan:
    """What each decoder layer processes in prefill, in visual tokens (text is added by formulas).

    ``rankings`` lists the separate ranking products ``(layer, query_rows, keys, projects)`` in
    total tokens (text included): rows of queries against keys, done where a selection is
    prepared; ``projects`` when the ranking needs its own K/Q projections (PyramidDrop).
    """

    visual_tokens: list[int]  # entering layer l's attention (its KV length minus text)
    mlp_visual_tokens: list[int]  # seen by layer l's o_proj and MLP
    rankings: list[tuple[int, int, int, bool]]
    routers: tuple[tuple[int, int, int], ...] = ()  # MoD linear routers: (layer, visual tokens scored, outputs)
    attention_skipped: tuple[int, ...] = ()  # EAS: layers without attention (no QKV, scores or o_proj; no KV)
    selection_flops: float = 0.0  # products of selections that are not attention rows (DART's cosine similarities)


@dataclass
class FlopsReport:
    formula: str
    dense: float
    recipe: float
    reduction: float  # 1 - recipe/dense
    kv_bytes_per_layer: list[int]
    units: str  # "FLOPs" or "MACs"

    def to_dict(self) -> dict[str, Any]:
        return {
            "formula": self.formula,
            "dense": self.dense,
            "recipe": self.recipe,
            "reduction": self.reduction,
            "kv_bytes_per_layer": list(self.kv_bytes_per_layer),
        }


CostFunction = Callable[[ModelSpec, TokenPlan, int], float]


@dataclass(frozen=True)
class Formula:
    units: str
    cost: CostFunction
    description: str


# ---- plans ------------------------------------------------------------------------------------
def dense_plan(spec: ModelSpec) -> TokenPlan:
    n = spec.tower().visual_tokens
    return TokenPlan([n] * spec.text.num_layers, [n] * spec.text.num_layers, [])


def recipe_plan(spec: ModelSpec, recipe: Recipe, text_tokens: int, prefix_tokens: int = 0) -> TokenPlan:
    """Token counts per layer, and where the ranking products happen, for a recipe."""
    from dataclasses import replace

    plan = _llm_plan(spec, recipe.llm_recipe(), text_tokens, prefix_tokens)
    extra = {"attention_skipped": tuple(recipe.skip_attention)}
    if recipe.pre_llm is not None and recipe.pre_llm.method == "dart":
        extra["selection_flops"] = (plan.selection_flops + 2.0 * recipe.pre_llm.pivots * spec.tower().visual_tokens
                                    * spec.text.hidden_size)
    return replace(plan, **extra)


def _llm_plan(spec: ModelSpec, recipe: Recipe, text_tokens: int, prefix_tokens: int) -> TokenPlan:
    if recipe.is_mod:
        return mod_plan(spec, recipe, text_tokens, prefix_tokens)
    attention = list(recipe.visual_tokens)
    mlp = recipe.mlp_visual_tokens()
    offset = recipe.score.attention_layer_offset
    rankings, dart = [], []
    for l in recipe.prune_layers:
        # Candidates are the visual tokens present just before the selection: layer_input
        # methods select among the previous layer's tokens, after_attention among layer l's.
        if recipe.prune_stage == "layer_input":
            candidates = attention[l - 1] if l > 0 else recipe.llm_visual_tokens
        else:
            candidates = attention[l]
        if mlp[l] == 0 or recipe.score.combine == "random":
            continue  # no ranking: the span is sliced away (VTW) or the subset is fixed (random baseline)
        if recipe.score.combine == "duplication":  # DART: pivot rows against the candidates, no attention rows
            dart.append(2.0 * (recipe.score.pivots + recipe.score.text_pivots) * candidates * spec.text.hidden_size)
            continue
        rank_layer = l + offset
        if rank_layer < 0:
            raise RecipeError(f"recipe ranks layer {l}'s tokens with the attention of layer {rank_layer}, which does not exist")
        # text query rows are the tokens after the image (the instruction), not the prefix before it
        after = text_tokens - prefix_tokens
        rows = {"last_text": 1, "text": after, "visual_and_text": after + candidates}[recipe.score.query_rows]
        # ranking with the pruning layer's own attention before it runs (PyramidDrop) projects
        # keys for every candidate token and queries for the ranking rows first
        projects = recipe.prune_stage == "layer_input" and offset == 0
        rankings.append((rank_layer, rows, text_tokens + candidates, projects))
    return TokenPlan(attention, mlp, rankings, selection_flops=sum(dart))


def mod_plan(spec: ModelSpec, recipe: Recipe, text_tokens: int, prefix_tokens: int = 0) -> TokenPlan:
    """Mixture-of-depths: each layer at the visual tokens it processes; a linear router scores every
    visual token of its layer (d x 1), the attention router ranks with the text rows of the layer
    before against that layer's keys (docs/mod.md)."""
    processed = list(recipe.visual_tokens)
    routed = recipe.mod_layers
    if recipe.mod.router != "attention":
        return TokenPlan(processed, processed, [], tuple((l, recipe.llm_visual_tokens, 1) for l in routed))
    after = text_tokens - prefix_tokens
    rows = {"last_text": 1, "text": after, "visual_and_text": None}[recipe.score.query_rows]
    if rows is None:
        raise RecipeError("the MoD attention router ranks with text query rows (last_text or text)")
    rankings = [(l - 1, rows, text_tokens + processed[l - 1], False) for l in routed]
    return TokenPlan(processed, processed, rankings)


# ---- formulas ---------------------------------------------------------------------------------
def _exact(spec: ModelSpec, plan: TokenPlan, text_tokens: int) -> float:
    t = spec.text
    d, heads, kv_heads, head_dim, inter = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size
    total = plan.selection_flops
    skipped = set(plan.attention_skipped)
    for layer, (visual, mlp_visual) in enumerate(zip(plan.visual_tokens, plan.mlp_visual_tokens)):
        n = text_tokens + visual
        m = text_tokens + mlp_visual
        if layer not in skipped:
            total += 2 * n * d * (heads + 2 * kv_heads) * head_dim  # fused QKV projection
            total += 2 * 2 * heads * n * n * head_dim  # Q·Kᵀ and probs·V (GQA broadcasts KV, H products)
            total += 2 * m * heads * head_dim * d  # o_proj
        total += 2 * m * d * inter * 3  # SwiGLU: gate, up, down
    for _layer, rows, keys, projects in plan.rankings:
        total += 2 * heads * rows * keys * head_dim  # ranking rows against all keys (softmax needs them all)
        if projects:
            total += 2 * keys * d * kv_heads * head_dim + 2 * rows * d * heads * head_dim
    for _layer, tokens, outputs in plan.routers:
        total += 2 * tokens * d * outputs  # MoD router: one linear product per visual token
    total += 2 * d * t.vocab_size  # LM head on the last position only
    return float(total)


def _fastv_eq5(spec: ModelSpec, plan: TokenPlan, text_tokens: int) -> float:
    # Paper's C(n) = 4nd² + 2n²d + 2ndm per layer; summing per layer equals K·C(n) + (L−K)·C(n̂).
    d, m = spec.text.hidden_size, spec.text.intermediate_size
    total = 0
    for layer, visual in enumerate(plan.visual_tokens):
        n = text_tokens + visual
        attention = 0 if layer in plan.attention_skipped else 4 * n * d * d + 2 * n * n * d
        total += attention + 2 * n * d * m
    return float(total)


def fitprune_layer_macs(d: int, m: int, n_in: int, n_out: int) -> float:
    """FitPrune code's MACs of one layer, visual tokens only: QKV and attention on the n_in tokens
    before the drop, o_proj and the SwiGLU MLP on the n_out after it (n_in = n_out: F(n) = 4nd² + 2n²d + 3ndm)."""
    return 3 * n_in * d * d + 2 * n_in * n_in * d + n_out * d * d + 3 * n_out * d * m


def _fitprune_macs(spec: ModelSpec, plan: TokenPlan, text_tokens: int) -> float:
    d, m = spec.text.hidden_size, spec.text.intermediate_size
    return float(sum(3 * n_after * d * m if layer in plan.attention_skipped else fitprune_layer_macs(d, m, n, n_after)
                     for layer, (n, n_after) in enumerate(zip(plan.visual_tokens, plan.mlp_visual_tokens))))


FORMULAS: dict[str, Formula] = {
    "exact": Formula("FLOPs", _exact, "every matrix product of the exported prefill graph"),
    "fastv-eq5": Formula("FLOPs", _fastv_eq5, "FastV paper Eq. 5"),
    "fitprune-macs": Formula("MACs", _fitprune_macs, "FitPrune code's MACs over visual tokens"),
}


# ---- entry point ------------------------------------------------------------------------------
def kv_bytes_per_layer(spec: ModelSpec, visual_tokens: list[int], text_tokens: int, kv_dtype_bytes: int = 2,
                       skipped: tuple[int, ...] | list[int] = ()) -> list[int]:
    """K and V cache bytes each layer holds after prefill (each layer caches what it processed; a layer whose
    attention is skipped, none)."""
    per_token = 2 * spec.text.num_kv_heads * spec.text.head_dim * kv_dtype_bytes
    return [0 if l in skipped else per_token * (text_tokens + n) for l, n in enumerate(visual_tokens)]


def prefill_cost(
    spec: ModelSpec,
    recipe: Recipe | None = None,
    text_tokens: int = 64,
    formula: str = "exact",
    kv_dtype_bytes: int = 2,
    prefix_tokens: int = 0,
) -> FlopsReport:
    """Dense and recipe prefill cost of ``spec`` with ``text_tokens`` non-visual prompt tokens,
    ``prefix_tokens`` of them before the image (the rest, after it, are the ranking's text rows)."""
    if formula not in FORMULAS:
        raise MllmError(f"unknown FLOPs formula '{formula}'; formulas: {', '.join(FORMULAS)}")
    try:
        text_tokens = operator.index(text_tokens)  # ints, NumPy ints; not 3.5
    except TypeError:
        raise MllmError(f"text_tokens must be an integer, got {text_tokens!r}") from None
    if text_tokens < 0:
        raise MllmError(f"text_tokens must be 0 or more, got {text_tokens}")
    if not 0 <= prefix_tokens <= text_tokens:
        raise MllmError(f"prefix_tokens must be between 0 and text_tokens ({text_tokens}), got {prefix_tokens}")
    if kv_dtype_bytes <= 0:
        raise MllmError(f"kv_dtype_bytes must be positive, got {kv_dtype_bytes!r}")
    chosen = FORMULAS[formula]
    spec = spec.tower()  # the dense baseline is the published model; a recipe's pre_llm stage is in its plan
    dense = chosen.cost(spec, dense_plan(spec), text_tokens)
    if recipe is None:
        plan = dense_plan(spec)
    else:
        recipe.check_model(spec)
        plan = recipe_plan(spec, recipe, text_tokens, prefix_tokens)
    cost = chosen.cost(spec, plan, text_tokens)
    return FlopsReport(
        formula=formula,
        dense=dense,
        recipe=cost,
        reduction=1.0 - cost / dense if dense else 0.0,
        kv_bytes_per_layer=kv_bytes_per_layer(spec, plan.visual_tokens, text_tokens, kv_dtype_bytes,
                                              plan.attention_skipped),
        units=chosen.units,
    )
