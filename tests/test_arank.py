"""ARank and MoD layer plans (issue 7, calibration side)."""

from __future__ import annotations

import pytest

import numpy as np
import torch

from mllm_deploy.calib.arank import arank_of_attention, arank_plan, arank_table, collect_arank, numerical_rank, prd_plan


def strictly_lower_of_rank(n: int, rank: int, rng) -> np.ndarray:
    """A strictly lower-triangular matrix of exactly ``rank``: entries (i, j) with i > j in distinct rows and columns."""
    matrix = np.zeros((n, n))
    for r in range(rank):
        matrix[n - 1 - r, r] = rng.uniform(0.1, 1.0)
    return matrix


def test_known_ranks_and_the_diagonal_is_excluded():
    rng = np.random.default_rng(0)
    n, ranks = 12, [1, 3, 5]
    heads = []
    for rank in ranks:
        head = strictly_lower_of_rank(n, rank, rng)
        head += np.diag(rng.uniform(0.5, 1.0, n))  # a full-rank diagonal, as every causal softmax map has
        heads.append(head)
    attention = np.stack(heads)
    assert [numerical_rank(np.tril(h, -1)) for h in attention] == ranks
    assert arank_of_attention(attention) == np.mean(ranks)
    assert numerical_rank(attention[0]) == n  # with the diagonal the map is always full rank


def test_tolerance_ignores_float32_noise():
    rng = np.random.default_rng(1)
    head = strictly_lower_of_rank(10, 2, rng) + 1e-9 * np.tril(rng.standard_normal((10, 10)), -1)
    assert numerical_rank(np.tril(head, -1)) == 2


def test_plans():
    assert arank_plan([5.0, 9.0, 1.0, 9.0, 3.0], dense_layers=2) == [0, 2, 4]
    mod, keep = prd_plan(32)
    assert mod == list(range(8, 32))  # p-MoD: layers 0-7 dense, 8-31 MoD (METHODS.md)
    assert keep[:8] == [1.0] * 8 and min(keep) == 0.15 and keep[8] <= 0.85


@pytest.mark.slow
def test_collect_arank_on_a_tiny_model(tiny_model_dirs):
    from transformers import LlavaForConditionalGeneration

    from mllm_deploy.formats.recipe import dense_recipe
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.export.verify import sample_inputs
    from mllm_deploy.models.registry import load_spec

    spec = load_spec(str(tiny_model_dirs["gqa56"]))[1]
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dirs["gqa56"]).eval()
    reference = RecipeReference(model, dense_recipe(spec))
    samples = []
    for seed in (0, 1):
        ids, pixels = (torch.from_numpy(a) for a in sample_inputs(spec, seed=seed))
        samples.append(collect_arank(reference, ids, reference.image_features(pixels)))
    table = arank_table(samples)
    n = samples[0][1]
    assert len(table["arank"]) == spec.text.num_layers
    assert all(0 < r <= n - 1 for r in table["arank"])  # a strictly lower triangle has rank <= n - 1
    assert np.allclose(table["arank_per_token"], np.array(table["arank"]) / n)
