"""Random-input checks of a routing kernel build against the NumPy references (plugins/ops.py).

Shared by the tests (``tests/test_cuda_kernels.py``: host build in CI, CUDA build on a GPU) and
by ``build-mllm --verify`` (the TensorRT plugin library on the target). Each case raises
``AssertionError`` naming what differs. TokenSelect and TokenScatter only move or scale values,
so they must match exactly; VisualScore sums in another order than NumPy's BLAS, so it is
compared with a float32-sized tolerance.

Two kinds of sizes: small ones that reach every corner (ties, NaN, GQA, every k, each query-row
mode) and real ones along the token axis: LLaVA-1.5's 576 visual tokens, LLaVA-NeXT's 2,880,
prompts up to T = 4,096, with small hidden and head sizes where only the token count matters.
A case marked ``slow`` is left out of quick runs (pytest.mark.slow); none is, at present: the whole
table runs in about 15 s on a 2-core host build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from mllm_deploy.plugins import ops

DTYPES = (np.float32, np.float16)
# rtol covers float32 summation-order differences over a few thousand terms and expf's ulp error.
# The absolute floor is relative to the largest score: FitPrune's self x cross scores are ~1e-7 at
# T = 4,096, where a fixed 1e-9 floor would have let through errors of 1%.
VISUAL_SCORE_RTOL, VISUAL_SCORE_ATOL = 2e-5, 1e-9
VISUAL_SCORE_ATOL_OF_MAX = 1e-7


@dataclass(frozen=True)
class KernelCase:
    name: str
    run: Callable[[object], None]  # takes a RoutingKernels
    slow: bool = False


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
REAL_SELECT_SIZES = (  # LLaVA-1.5 (576) and LLaVA-NeXT (2,880) images in short and 4k-token prompts
    (640, 576, 5, 4, (1, 288, 576)),
    (4096, 576, 35, 4, (1, 144, 575, 576)),
    (2944, 2880, 35, 4, (1, 1440, 2880)),
    (4096, 2880, 35, 4, (1, 720, 2879, 2880)),
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
REAL_SCATTER_SIZES = ((640, 8, (1, 288, 640)), (4096, 4, (0, 576, 2880, 4096)))


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
FASTV = ("last_text", "mean", "single", True)
FASTV_FULL_Q = ("last_text", "max", "single", False)
FITPRUNE = ("visual_and_text", "max", "self_times_cross", False)
FITPRUNE_MEAN = ("visual_and_text", "mean", "self_times_cross", False)
TEXT_MEAN = ("text", "mean", "single", False)
# Real token counts; heads and head_dim stay small except where they are the point (head_dim 128 and
# 72 run several head_dim chunks, a partial one for 72; 40 heads need two batches of the kernel's
# per-block softmax statistics). (geometry, modes, pruned, dtypes, slow). NumPy's reference holds
# [heads, rows, seq_len] float32 logits, so heads x rows x seq_len stays below ~50M (200 MB).
REAL_SCORE_CASES = (
    ((2, 2, 640, 8, 576, 5), (FASTV, FITPRUNE, FITPRUNE_MEAN, TEXT_MEAN), False, DTYPES, False),
    ((2, 1, 4096, 8, 576, 35), (FASTV, FASTV_FULL_Q, FITPRUNE), False, DTYPES, False),
    ((2, 1, 4096, 8, 576, 35), (FITPRUNE_MEAN, TEXT_MEAN), True, (np.float16,), False),
    ((2, 1, 4096, 8, 2880, 35), (FASTV, FITPRUNE), False, DTYPES, False),
    ((2, 1, 4096, 8, 2880, 35), (FITPRUNE_MEAN, TEXT_MEAN), True, (np.float32,), False),
    ((4, 4, 700, 128, 576, 5), (FASTV, FITPRUNE), False, (np.float16,), False),
    ((3, 1, 1000, 72, 576, 35), (FASTV_FULL_Q, FITPRUNE_MEAN), True, (np.float32,), False),
    ((40, 8, 200, 8, 144, 6), (FASTV, FITPRUNE, TEXT_MEAN), False, (np.float32,), False),
    # LLaVA-1.5-7B's attention geometry itself (32 heads of 128) on a 1,200-token prompt (~4 s on the host)
    ((32, 32, 1200, 128, 576, 35), (FASTV, FITPRUNE), False, (np.float16,), False),
)


def _visual_score_inputs(geometry, mode, pruned: bool, dtype):
    heads, kv_heads, seq_len, head_dim, n_vis, vis_start = geometry
    query_rows, head_reduction, combine, last_only = mode
    rng = np.random.default_rng([heads, seq_len, n_vis, len(query_rows), len(combine)])
    q_len = 1 if last_only else seq_len
    q = rng.standard_normal((1, heads, q_len, head_dim)).astype(dtype)
    k = rng.standard_normal((1, kv_heads, seq_len, head_dim)).astype(dtype)
    positions = _positions(rng, seq_len, pruned)
    attrs = dict(n_vis=n_vis, query_rows=query_rows, head_reduction=head_reduction, combine=combine,
                 scale=float(head_dim ** -0.5))
    return q, k, positions, np.array([vis_start], np.int64), attrs


def _check_scores(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"VisualScore: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}")
    atol = min(VISUAL_SCORE_ATOL, VISUAL_SCORE_ATOL_OF_MAX * float(np.nanmax(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=VISUAL_SCORE_RTOL, atol=atol, err_msg=f"VisualScore {what}")


def _visual_score_name(geometry, mode, pruned: bool, dtype) -> str:
    heads, kv_heads, seq_len, head_dim, n_vis, _ = geometry
    query_rows, head_reduction, combine, last_only = mode
    return (f"VisualScore-H{heads}x{kv_heads}-T{seq_len}-D{head_dim}-n{n_vis}-{query_rows}-{head_reduction}-{combine}"
            f"{'-lastq' if last_only else ''}{'-gappy' if pruned else ''}-{np.dtype(dtype).name}")


def _visual_score_case(geometry, mode, pruned: bool, dtype, slow: bool = False) -> KernelCase:
    def run(kernels) -> None:
        q, k, positions, start, attrs = _visual_score_inputs(geometry, mode, pruned, dtype)
        got = kernels.visual_score(q, k, positions, start, **attrs)[0]
        want = ops.visual_score(q, k, positions, start, **attrs)[0]
        _check_scores(got, want, f"{attrs['query_rows']}/{attrs['head_reduction']}/{attrs['combine']}")

    return KernelCase(_visual_score_name(geometry, mode, pruned, dtype), run, slow)


# Tilings for the host build's mllm_visual_score_host_tiled: tiles small enough that the small
# geometries cross many tile boundaries, end on partial tiles, need several head batches and split
# their heads over blocks (target_blocks large) or not at all (target_blocks 1).
HOST_TILINGS = (
    dict(row_tile=3, key_tile=5, dim_chunk=3, head_batch=2, target_blocks=1),
    dict(row_tile=7, key_tile=16, dim_chunk=8, head_batch=3, target_blocks=64),
    dict(row_tile=1, key_tile=1, dim_chunk=1, head_batch=1, target_blocks=1000),
    dict(row_tile=64, key_tile=128, dim_chunk=128, head_batch=64, target_blocks=2),
)


def host_tiling_cases() -> list[KernelCase]:
    """VisualScore on the host build with other tilings than the kernel's (host reference build only)."""
    cases = []
    for t, tiling in enumerate(HOST_TILINGS):
        for geometry in SCORE_GEOMETRIES + ((40, 8, 50, 12, 30, 4),):
            for mode in (FASTV, FASTV_FULL_Q, TEXT_MEAN, FITPRUNE, FITPRUNE_MEAN):
                for pruned in (False, True):
                    dtype = DTYPES[(t + int(pruned)) % 2]

                    def run(kernels, geometry=geometry, mode=mode, pruned=pruned, dtype=dtype, tiling=tiling) -> None:
                        q, k, positions, start, attrs = _visual_score_inputs(geometry, mode, pruned, dtype)
                        got = kernels.visual_score(q, k, positions, start, tiling=tiling, **attrs)[0]
                        want = ops.visual_score(q, k, positions, start, **attrs)[0]
                        _check_scores(got, want, f"tiling {tiling}")

                    cases.append(KernelCase(f"tiling{t}-" + _visual_score_name(geometry, mode, pruned, dtype), run))
    return cases


def all_cases(include_slow: bool = True) -> list[KernelCase]:
    cases = [_token_select_case(*size, kind, dtype) for size in SELECT_SIZES + REAL_SELECT_SIZES
             for kind in ("random", "ties", "special") for dtype in DTYPES]
    cases += [_token_scatter_case(*size, scaled, dtype) for size in SCATTER_SIZES + REAL_SCATTER_SIZES
              for scaled in (False, True) for dtype in DTYPES]
    cases += [_visual_score_case(geometry, mode, pruned, dtype) for geometry in SCORE_GEOMETRIES
              for mode in SCORE_MODES for pruned in (False, True) for dtype in DTYPES]
    cases += [_visual_score_case(geometry, mode, pruned, dtype, slow) for geometry, modes, pruned, dtypes, slow
              in REAL_SCORE_CASES for mode in modes for dtype in dtypes]
    return [case for case in cases if include_slow or not case.slow]


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
