"""Random-input checks of a routing kernel build against the NumPy references (plugins/ops.py).

Shared by the tests (``tests/test_cuda_kernels.py``: host build in CI, CUDA build on a GPU) and
by ``build-mllm --verify`` (the TensorRT plugin library on the target). Each case raises
``AssertionError`` naming what differs. TokenSelect and TokenScatter only move or scale values,
so they must match exactly; VisualScore sums in another order than NumPy's BLAS, so it is
compared with a float32-sized tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from mllm_deploy.plugins import ops

DTYPES = (np.float32, np.float16)
# rtol covers float32 summation-order differences over a few thousand terms and expf's ulp error
VISUAL_SCORE_RTOL, VISUAL_SCORE_ATOL = 2e-5, 1e-9


@dataclass(frozen=True)
class KernelCase:
    name: str
    run: Callable[[object], None]  # takes a RoutingKernels


def _scores(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "random":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ties":  # few distinct values: ties everywhere, resolved to the lower index
        return (rng.integers(0, 4, n) / 4).astype(np.float32)
    values = rng.standard_normal(n).astype(np.float32)  # "special": infinities, NaN, signed zeros
    picks = rng.choice([np.inf, -np.inf, np.nan, 0.0, -0.0], size=n)
    mask = rng.random(n) < 0.3
    values[mask] = picks[mask]
    return values


def _positions(rng: np.random.Generator, seq_len: int, pruned: bool) -> np.ndarray:
    if not pruned:
        return np.arange(seq_len, dtype=np.int64)[None]
    # tokens that survived an earlier pruning keep their original, now gappy, positions
    return np.sort(rng.choice(np.arange(3 * seq_len), size=seq_len, replace=False)).astype(np.int64)[None]


def _equal(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{name}: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}")
    if not np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)):  # bitwise, NaN included
        bad = np.argwhere(got != want)[:3].tolist()
        raise AssertionError(f"{name}: differs at {bad}")


# ---- TokenSelect ----------------------------------------------------------------------------------------
SELECT_SIZES = (  # (seq_len, n_vis, vis_start, hidden, ks): ks None means every k in 1..n_vis
    (3, 1, 1, 4, None),
    (12, 7, 2, 5, None),
    (80, 64, 5, 16, None),
    (50, 50, 0, 3, None),
    (340, 300, 40, 8, (1, 2, 150, 299, 300)),
)


def _token_select_case(seq_len: int, n_vis: int, vis_start: int, hidden: int, ks, kind: str, dtype) -> KernelCase:
    def run(kernels) -> None:
        rng = np.random.default_rng([seq_len, n_vis, len(kind)])
        scores = _scores(rng, n_vis, kind)
        data = rng.standard_normal((1, seq_len, hidden)).astype(dtype)
        positions = _positions(rng, seq_len, pruned=True)
        start = np.array([vis_start], np.int64)
        for k in ks or range(1, n_vis + 1):
            got = kernels.token_select(scores, start, data, positions, k=k, n_vis=n_vis)
            want = ops.token_select(scores, start, data, positions, k=k, n_vis=n_vis)
            for label, g, w in zip(("data", "positions", "rows"), got, want):
                _equal(f"TokenSelect k={k} {label}", g, np.asarray(w))

    name = f"TokenSelect-T{seq_len}-n{n_vis}-vs{vis_start}-{kind}-{np.dtype(dtype).name}"
    return KernelCase(name, run)


# ---- TokenScatter ---------------------------------------------------------------------------------------
SCATTER_SIZES = ((1, 3, (0, 1)), (9, 4, (0, 1, 4, 9)), (64, 33, (16, 64)))  # (seq_len, hidden, row counts)


def _token_scatter_case(seq_len: int, hidden: int, counts, scaled: bool, dtype) -> KernelCase:
    def run(kernels) -> None:
        rng = np.random.default_rng([seq_len, hidden, int(scaled)])
        base = rng.standard_normal((1, seq_len, hidden)).astype(dtype)
        scale = rng.uniform(-2, 2, (1, seq_len, 1)).astype(dtype) if scaled else None
        for count in counts:
            rows = rng.permutation(seq_len)[:count].astype(np.int64)
            updates = rng.standard_normal((1, count, hidden)).astype(dtype)
            got = kernels.token_scatter(base, updates, rows, scale)[0]
            want = ops.token_scatter(base, updates, rows, scale)[0]
            _equal(f"TokenScatter rows={count}", got, want)

    name = f"TokenScatter-T{seq_len}-D{hidden}-{'scaled' if scaled else 'identity'}-{np.dtype(dtype).name}"
    return KernelCase(name, run)


# ---- VisualScore ----------------------------------------------------------------------------------------
SCORE_GEOMETRIES = (  # (heads, kv_heads, seq_len, head_dim, n_vis, vis_start)
    (4, 4, 20, 8, 10, 3),
    (8, 2, 30, 16, 12, 5),
    (4, 1, 160, 32, 144, 6),
)
SCORE_MODES = (  # (query_rows, head_reduction, combine, q holds only the last token)
    ("last_text", "mean", "single", True),
    ("last_text", "max", "single", False),
    ("text", "mean", "single", False),
    ("text", "max", "single", False),
    ("visual_and_text", "max", "self_times_cross", False),
    ("visual_and_text", "mean", "self_times_cross", False),
    ("visual_and_text", "mean", "single", False),
)


def _visual_score_case(geometry, mode, pruned: bool, dtype) -> KernelCase:
    heads, kv_heads, seq_len, head_dim, n_vis, vis_start = geometry
    query_rows, head_reduction, combine, last_only = mode

    def run(kernels) -> None:
        rng = np.random.default_rng([heads, seq_len, n_vis, len(query_rows), len(combine)])
        q_len = 1 if last_only else seq_len
        q = rng.standard_normal((1, heads, q_len, head_dim)).astype(dtype)
        k = rng.standard_normal((1, kv_heads, seq_len, head_dim)).astype(dtype)
        positions = _positions(rng, seq_len, pruned)
        attrs = dict(n_vis=n_vis, query_rows=query_rows, head_reduction=head_reduction, combine=combine,
                     scale=float(head_dim ** -0.5))
        start = np.array([vis_start], np.int64)
        got = kernels.visual_score(q, k, positions, start, **attrs)[0]
        want = ops.visual_score(q, k, positions, start, **attrs)[0]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise AssertionError(f"VisualScore: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}")
        np.testing.assert_allclose(got, want, rtol=VISUAL_SCORE_RTOL, atol=VISUAL_SCORE_ATOL,
                                   err_msg=f"VisualScore {query_rows}/{head_reduction}/{combine}")

    name = (f"VisualScore-H{heads}x{kv_heads}-T{seq_len}-n{n_vis}-{query_rows}-{head_reduction}-{combine}"
            f"{'-lastq' if last_only else ''}{'-gappy' if pruned else ''}-{np.dtype(dtype).name}")
    return KernelCase(name, run)


def all_cases() -> list[KernelCase]:
    cases = [_token_select_case(*size, kind, dtype) for size in SELECT_SIZES
             for kind in ("random", "ties", "special") for dtype in DTYPES]
    cases += [_token_scatter_case(*size, scaled, dtype) for size in SCATTER_SIZES for scaled in (False, True)
              for dtype in DTYPES]
    cases += [_visual_score_case(geometry, mode, pruned, dtype) for geometry in SCORE_GEOMETRIES
              for mode in SCORE_MODES for pruned in (False, True) for dtype in DTYPES]
    return cases


def run_cases(kernels, cases: Iterable[KernelCase] | None = None) -> list[tuple[str, str | None]]:
    """(case name, None or the failure) for every case; never raises for a mismatch."""
    results = []
    for case in cases if cases is not None else all_cases():
        try:
            case.run(kernels)
            results.append((case.name, None))
        except AssertionError as exc:
            results.append((case.name, " ".join(str(exc).split())[:300]))
    return results
