"""ARank (γ-MoD, METHODS.md): how much of a layer's attention is redundant.

For one sample and layer, each head's post-softmax map A[h] is reduced to its strictly lower
triangle (the diagonal is zeroed: a causal softmax map is otherwise always full rank) and its
numerical rank is taken by SVD with tolerance sigma_max * n * eps(float32); ARank is the mean
over heads. ARank grows with the sequence length, so layers are compared within one sample
length or normalised by n. Maps are formed one layer at a time, never all layers at once.
"""

from __future__ import annotations

import numpy as np

EPS_FP32 = float(np.finfo(np.float32).eps)


def numerical_rank(matrix: np.ndarray) -> int:
    """Rank with numpy's default tolerance on float32 data: sigma_max * max(shape) * eps(float32)."""
    singular = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
    if singular.size == 0 or singular[0] == 0.0:
        return 0
    tolerance = singular[0] * max(matrix.shape) * EPS_FP32
    return int(np.sum(singular > tolerance))


def arank_of_attention(attention: np.ndarray) -> float:
    """Mean over heads of the numerical rank of the strictly lower triangle; attention: [H, T, T]."""
    ranks = [numerical_rank(np.tril(head, k=-1)) for head in np.asarray(attention)]
    return float(np.mean(ranks)) if ranks else 0.0


def collect_arank(reference, input_ids, features) -> tuple[list[float], int]:
    """Per-layer ARank of one sample (dense prefill) and its sequence length n."""
    import torch

    ranks: list[float] = []

    def observe(layer, q, k, positions, vis_start, n_vis):
        scores = q[0].float() @ k[0].float().transpose(-1, -2) * q.shape[-1] ** -0.5  # [H, T, T], this layer only
        future = positions[None, :] > positions[:, None]
        probs = torch.softmax(scores.masked_fill(future, torch.finfo(torch.float32).min), dim=-1)
        ranks.append(arank_of_attention(probs.numpy()))

    reference.prefill(input_ids, features, observer=observe)
    return ranks, int(input_ids.shape[1])


def arank_table(per_sample: list[tuple[list[float], int]]) -> dict:
    """Mean ARank per layer over samples, raw and normalised by the sample length."""
    raw = np.mean([ranks for ranks, _ in per_sample], axis=0)
    normalised = np.mean([np.asarray(ranks) / n for ranks, n in per_sample], axis=0)
    return {"arank": [float(v) for v in raw], "arank_per_token": [float(v) for v in normalised]}


def arank_plan(arank: list[float], dense_layers: int) -> list[int]:
    """Layers to turn into MoD layers: all but the ``dense_layers`` highest-ARank layers (ties: lower index stays dense)."""
    order = sorted(range(len(arank)), key=lambda l: (-arank[l], l))
    dense = set(order[:dense_layers])
    return [l for l in range(len(arank)) if l not in dense]


def prd_plan(num_layers: int, threshold: float = 0.85, floor: float = 0.15) -> tuple[list[int], list[float]]:
    """p-MoD's progressive ratio decay: R_l = 0.5 cos(pi l / (L-1)) + 0.5; layer l is MoD iff R_l <= threshold,
    keeping max(R_l, floor) of its visual tokens. Returns (MoD layers, keep ratio per layer)."""
    ratios = [0.5 * np.cos(np.pi * l / (num_layers - 1)) + 0.5 for l in range(num_layers)]
    mod_layers = [l for l, r in enumerate(ratios) if r <= threshold]
    keep = [float(max(r, floor)) if l in mod_layers else 1.0 for l, r in enumerate(ratios)]
    return mod_layers, keep
