"""prefill.onnx: the builder a recipe calls for, pruning (export/pruned_prefill.py) or mixture-of-depths
(export/mod_prefill.py). The builders import the layer pieces of export/text_graphs.py, never this module."""

from __future__ import annotations

import numpy as np

from mllm_deploy.export.graph import GraphBuilder
from mllm_deploy.export.mod_prefill import ModPrefillBuilder
from mllm_deploy.export.pruned_prefill import PrefillBuilder
from mllm_deploy.formats.geometry import ModelSpec
from mllm_deploy.formats.recipe import Recipe, dense_recipe


def build_prefill_graph(graph: GraphBuilder, spec: ModelSpec, weights: dict, rope: tuple[np.ndarray, np.ndarray],
                        float_type: int, recipe: Recipe | None = None, routing: str = "native") -> None:
    """The prefill graph with the recipe (dense when None) applied, routing ``native`` or ``plugin``."""
    recipe = recipe or dense_recipe(spec)
    builder = ModPrefillBuilder if recipe.is_mod else PrefillBuilder
    builder(graph, spec, weights, rope, float_type, recipe, routing).build()
