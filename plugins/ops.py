"""NumPy references of the routing ops: the spec the CUDA, TensorRT and ONNX Runtime kernels are tested against.

Style of Polygraphy's ``pluginref``: ``REFERENCES[op_type](*inputs, **attributes)`` takes NumPy
arrays in the node's input order plus the node's attributes (``plugin_version`` and
``plugin_namespace`` included, and ignored) and returns a tuple of outputs.

Meaning agrees with ``calib/scoring.py`` (``visual_scores``, ``select_top``) and
``calib/reference.py`` (``RecipeReference._select``); only NumPy is imported here.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

DOMAIN = "mllm_deploy"
VERSION = 1
PLUGIN_VERSION = "1"  # TensorRT's ONNX parser looks plugins up by (op_type, plugin_version, plugin_namespace)
PLUGIN_NAMESPACE = DOMAIN
OP_NAMES = ("VisualScore", "TokenSelect", "TokenScatter")

QUERY_ROWS = ("last_text", "text", "visual_and_text")
HEAD_REDUCTIONS = ("mean", "max")
COMBINES = ("single", "self_times_cross")

# Semantic attributes of each op (all required) with their Python types; the schemas, make_node
# and the ORT kernels are all derived from this table so they cannot drift apart.
ATTRIBUTES: dict[str, dict[str, type]] = {
    "VisualScore": {"n_vis": int, "query_rows": str, "head_reduction": str, "combine": str, "scale": float},
    "TokenSelect": {"k": int, "n_vis": int},
    "TokenScatter": {},
}
STRING_CHOICES: dict[str, tuple[str, ...]] = {
    "query_rows": QUERY_ROWS, "head_reduction": HEAD_REDUCTIONS, "combine": COMBINES,
}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def _scalar_index(vis_start: np.ndarray) -> int:
    flat = np.asarray(vis_start).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"vis_start must hold one element, got shape {np.shape(vis_start)}")
    return int(flat[0])


def _check_choice(name: str, value: str) -> None:
    if value not in STRING_CHOICES[name]:
        raise ValueError(f"{name} must be one of {STRING_CHOICES[name]}, got {value!r}")


def _check_span(vis_start: int, n_vis: int, seq_len: int) -> None:
    if n_vis <= 0 or vis_start < 0 or vis_start + n_vis > seq_len:
        raise ValueError(f"visual span [{vis_start}, {vis_start + n_vis}) does not fit a sequence of {seq_len}")


def query_row_indices(query_rows: str, vis_start: int, n_vis: int, seq_len: int) -> np.ndarray:
    """Rows whose attention ranks the visual tokens (text rows are the tokens after the image)."""
    _check_choice("query_rows", query_rows)
    text_after = np.arange(vis_start + n_vis, seq_len, dtype=np.int64)
    if query_rows == "last_text":
        return np.array([seq_len - 1], dtype=np.int64)
    if query_rows == "text":
        return text_after
    return np.concatenate([np.arange(vis_start, vis_start + n_vis, dtype=np.int64), text_after])


def visual_score(q: np.ndarray, k: np.ndarray, positions: np.ndarray, vis_start: np.ndarray, *, n_vis: int,
                 query_rows: str, head_reduction: str, combine: str, scale: float,
                 plugin_version: str = PLUGIN_VERSION, plugin_namespace: str = PLUGIN_NAMESPACE) -> tuple[np.ndarray]:
    """Importance of each visual token, [n_vis] float32 (larger is kept).

    q [1, H, Tq, Dh], k [1, Hkv, T, Dh] (query head h reads kv head h // (H / Hkv)), positions [1, T],
    vis_start [1]. q normally holds all T tokens; it may hold only the last Tq (the exporter projects
    just the last token's query for ``last_text``) as long as every query row used is among them.
    Only the [H, R, T] attention rows are formed, never [T, T].
    """
    _check_choice("head_reduction", head_reduction)
    _check_choice("combine", combine)
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(f"q and k must be [1, H, T, Dh], got {q.shape} and {k.shape}")
    _, heads, q_len, head_dim = q.shape
    _, kv_heads, seq_len, _ = k.shape
    if heads % kv_heads or k.shape[3] != head_dim or q_len > seq_len:
        raise ValueError(f"k {k.shape} does not match q {q.shape}")
    start = _scalar_index(vis_start)
    _check_span(start, n_vis, seq_len)
    pos = np.asarray(positions).reshape(-1)
    if pos.size != seq_len:
        raise ValueError(f"positions must be [1, {seq_len}], got {np.shape(positions)}")
    rows = query_row_indices(query_rows, start, n_vis, seq_len)
    if rows.size == 0:  # "text" with no text after the image: PyTorch would return NaN
        raise ValueError("no query rows: the visual span ends the sequence")
    first_q = seq_len - q_len  # sequence index of q's first row
    if rows[0] < first_q:
        raise ValueError(f"{query_rows} rows start at {rows[0]} but q holds only the last {q_len} of {seq_len} tokens")

    # float32 throughout, as scoring.attention_rows (fp16 q/k are exact in float32)
    groups = heads // kv_heads
    q_rows = q[0][:, rows - first_q].astype(np.float32).reshape(kv_heads, groups, rows.size, head_dim)
    k_t = k[0].astype(np.float32).transpose(0, 2, 1)[:, None]  # [Hkv, 1, Dh, T]: GQA by broadcasting, no repeat
    logits = (q_rows @ k_t).reshape(heads, rows.size, seq_len) * np.float32(scale)  # [H, R, T]
    # -inf rather than PyTorch's finfo.min: same softmax (each row sees itself, so no row is all masked)
    future = pos[None, :] > pos[rows][:, None]  # [R, T]
    logits = np.where(future[None], np.float32(-np.inf), logits)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    visual = probs[:, :, start:start + n_vis]  # [H, R, n_vis]
    reduced = visual.max(axis=0) if head_reduction == "max" else visual.mean(axis=0)  # [R, n_vis]
    if combine == "self_times_cross":
        # FitPrune: mass from the first n_vis rows (visual queries) times mass from the rest (text queries)
        self_mass = reduced[:n_vis].sum(axis=0) / np.float32(n_vis)
        cross_mass = reduced[n_vis:].sum(axis=0) / np.float32(max(reduced.shape[0] - n_vis, 1))
        return ((self_mass * cross_mass).astype(np.float32),)
    return (reduced.mean(axis=0).astype(np.float32),)


def select_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores in ascending order; ties go to the lower index (ONNX TopK's rule)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")[:k]  # stable descending
    return np.sort(order).astype(np.int64)


def token_select(scores: np.ndarray, vis_start: np.ndarray, data: np.ndarray, positions: np.ndarray, *, k: int,
                 n_vis: int, plugin_version: str = PLUGIN_VERSION,
                 plugin_namespace: str = PLUGIN_NAMESPACE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the k best visual rows of data [1, T, D] and positions [1, T], in original order.

    Returns (data[:, rows], positions[:, rows], rows) with rows = [0, vs) ++ (vs + kept) ++ [vs + n_vis, T).
    """
    if not 0 < k <= n_vis:
        raise ValueError(f"k must be in (0, n_vis={n_vis}], got {k}")
    if np.shape(scores) != (n_vis,):
        raise ValueError(f"scores must be [{n_vis}], got {np.shape(scores)}")
    if data.ndim != 3 or data.shape[0] != 1 or np.shape(positions) != (1, data.shape[1]):
        raise ValueError(f"data must be [1, T, D] and positions [1, T], got {data.shape} and {np.shape(positions)}")
    seq_len = data.shape[1]
    start = _scalar_index(vis_start)
    _check_span(start, n_vis, seq_len)
    rows = np.concatenate([np.arange(start, dtype=np.int64), start + select_top(scores, k),
                           np.arange(start + n_vis, seq_len, dtype=np.int64)])
    return data[:, rows], np.asarray(positions)[:, rows].astype(np.int64), rows


def token_scatter(base: np.ndarray, updates: np.ndarray, rows: np.ndarray, skip_scale: np.ndarray | None = None, *,
                  plugin_version: str = PLUGIN_VERSION, plugin_namespace: str = PLUGIN_NAMESPACE) -> tuple[np.ndarray]:
    """Mixture-of-depths write-back: processed rows replaced by ``updates``, the others kept or scaled.

    base [1, T, D], updates [1, K, D], rows [K] distinct, skip_scale [1, T, 1] or None.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if base.ndim != 3 or updates.shape != (base.shape[0], rows.size, base.shape[2]):
        raise ValueError(f"updates must be [1, {rows.size}, {base.shape[-1]}], got {updates.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= base.shape[1] or np.unique(rows).size != rows.size):
        raise ValueError(f"rows must be distinct indices into {base.shape[1]} rows")
    # Scaling every row first is the same as scaling only the skipped ones: processed rows are overwritten.
    out = (base * skip_scale).astype(base.dtype) if skip_scale is not None else base.copy()
    out[:, rows] = updates
    return (out,)


REFERENCES: dict[str, Callable[..., tuple[np.ndarray, ...]]] = {
    "VisualScore": visual_score,
    "TokenSelect": token_select,
    "TokenScatter": token_scatter,
}
