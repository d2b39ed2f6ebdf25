"""Ranking visual tokens at a pruning layer (PyTorch): the semantics the exported graphs reproduce.

All functions take one layer's post-RoPE queries and keys and compute only the attention
rows they need: the full [T, T] map is never formed here.
"""

from __future__ import annotations

import torch

from mllm_deploy.formats.recipe import ScoreSpec


def attention_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention of the query rows ``rows`` over all keys: [H, R, T] (float32).

    q: [1, H, T, Dh]; k: [1, H, T, Dh] (already repeated for GQA); positions: [T] original ids.
    """
    q_rows = q[0, :, rows].float()  # [H, R, Dh]
    scores = q_rows @ k[0].float().transpose(-1, -2) * q.shape[-1] ** -0.5  # [H, R, T]
    future = positions[None, :] > positions[rows][:, None]  # [R, T]
    scores = scores.masked_fill(future[None], torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1)


def query_rows(spec: ScoreSpec, vis_start: int, n_vis: int, seq_len: int) -> torch.Tensor:
    """Indices of the query rows a score uses; text rows are the tokens after the image."""
    text_after = torch.arange(vis_start + n_vis, seq_len)
    if spec.query_rows == "last_text":
        return torch.tensor([seq_len - 1])
    if spec.query_rows == "text":
        return text_after
    return torch.cat([torch.arange(vis_start, vis_start + n_vis), text_after])  # visual_and_text


def visual_scores(spec: ScoreSpec, q, k, positions, vis_start: int, n_vis: int) -> torch.Tensor:
    """Importance of each current visual token, [n_vis] float32; larger is kept."""
    seq_len = q.shape[2]
    rows = query_rows(spec, vis_start, n_vis, seq_len)
    probs = attention_rows(q, k, rows, positions)[:, :, vis_start:vis_start + n_vis]  # [H, R, n_vis]
    reduced = probs.amax(dim=0) if spec.head_reduction == "max" else probs.mean(dim=0)  # [R, n_vis]
    if spec.combine == "self_times_cross":
        # FitPrune: mass received from visual queries (per visual token) times from text queries
        self_mass = reduced[:n_vis].sum(dim=0) / n_vis
        cross_mass = reduced[n_vis:].sum(dim=0) / max(reduced.shape[0] - n_vis, 1)
        return self_mass * cross_mass
    return reduced.mean(dim=0)


def select_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` best scores, ascending. Ties go to the lower index, as ONNX TopK."""
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values
