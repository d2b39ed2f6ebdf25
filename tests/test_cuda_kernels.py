"""The routing kernels (plugins/cuda) against the NumPy references of plugins/ops.py.

CI has no GPU: the CUDA source is compiled (not run) for every target architecture, and the host
reference build of the same C ABI, which applies the very per-element rules of the kernels
(routing_math.h), is run on random inputs. On a GPU machine the CUDA build runs the same cases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mllm_deploy.plugins import ops
from mllm_deploy.plugins import kernel_checks
from mllm_deploy.plugins.kernel_checks import all_cases, host_tiling_cases
from mllm_deploy.plugins.kernels import (ARCHITECTURES, KernelBuildError, KernelError, RoutingKernels,
                                         build_cuda_library, build_host_library, compile_cuda_objects, find_cxx,
                                         find_nvcc, gencode_flags, kernel_tiling)

CASES = all_cases()
CASE_PARAMS = [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
TILING_CASES = host_tiling_cases()


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvgpu")


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory) -> RoutingKernels:
    if find_cxx() is None:
        pytest.skip("no C++ compiler to build the host reference kernels")
    return RoutingKernels(build_host_library(tmp_path_factory.mktemp("host-kernels")))


@pytest.fixture(scope="module")
def cuda_kernels(tmp_path_factory) -> RoutingKernels:
    if find_nvcc() is None:
        pytest.skip("nvcc not found: the CUDA kernels cannot be built here")
    if not _gpu_present():
        pytest.skip("no NVIDIA GPU on this machine (CI compiles the kernels without running them)")
    try:
        kernels = RoutingKernels(build_cuda_library(("native",), tmp_path_factory.mktemp("cuda-kernels")))
    except KernelBuildError as exc:  # a GPU and nvcc are here: a build failure is a real failure
        pytest.fail(f"CUDA build for this GPU failed: {exc}")
    if kernels.device_count() < 1:
        pytest.skip("the CUDA runtime sees no GPU")
    return kernels


@pytest.mark.slow
def test_cuda_kernels_compile_for_every_target_architecture(tmp_path):
    """sm_80/86/87 (Orin)/89/90/110 (Thor) in one nvcc call, compile only; the CI stand-in for a GPU."""
    if find_nvcc() is None:
        pytest.skip("nvcc not found (install the CUDA toolkit to compile the kernels)")
    assert {"87", "110"} <= set(ARCHITECTURES)
    start = time.perf_counter()
    obj = compile_cuda_objects(tmp_path, ARCHITECTURES)
    assert obj.is_file() and obj.stat().st_size > 10_000
    assert time.perf_counter() - start < 120


def test_gencode_flags_cover_each_arch_and_embed_ptx():
    flags = gencode_flags(("87", "110"))
    assert "-gencode=arch=compute_87,code=sm_87" in flags and "-gencode=arch=compute_110,code=sm_110" in flags
    assert flags[-1] == "-gencode=arch=compute_110,code=compute_110"  # PTX for GPUs newer than the list
    assert gencode_flags(("native",)) == ["-arch=native"]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_host_build_matches_numpy_reference(host_kernels, case):
    case.run(host_kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_cuda_build_matches_numpy_reference(cuda_kernels, case):
    case.run(cuda_kernels)


@pytest.mark.parametrize("case", TILING_CASES, ids=[c.name for c in TILING_CASES])
def test_host_visual_score_with_other_tilings_matches_numpy_reference(host_kernels, case):
    """Tiny tiles: partial row/key/head_dim tiles, many head batches, head splits; same results."""
    case.run(host_kernels)


def test_case_list_spans_k_dtypes_and_modes():
    names = [c.name for c in CASES]
    for word in ("ties", "special", "float16", "float32", "self_times_cross", "lastq", "gappy", "scaled"):
        assert any(word in n for n in names), word


def test_case_list_reaches_real_token_counts():
    """LLaVA-1.5 (576) and LLaVA-NeXT (2,880) images, 4k-token prompts, k = 1, a middle k and k = N."""
    for n_vis in (576, 2880):
        sizes = [s for s in kernel_checks.REAL_SELECT_SIZES if s[1] == n_vis]
        assert any(s[0] == 4096 for s in sizes), n_vis
        for size in sizes:
            assert 1 in size[4] and n_vis in size[4] and any(1 < k < n_vis for k in size[4]), size
    names = [c.name for c in CASES]
    for n_vis in (576, 2880):
        for rows in ("visual_and_text-max-self_times_cross", "last_text-mean-single-lastq"):
            assert any(f"T4096-D8-n{n_vis}-{rows}" in n for n in names), (n_vis, rows)
    assert any("TokenScatter-T4096" in n for n in names)
    assert any("VisualScore-H32x32-T1200-D128" in n for n in names)  # LLaVA-1.5-7B's heads themselves


def test_tiling_is_the_kernels_own():
    """The CUDA kernel's thread layout is written for these values (static_asserts in routing_kernels.cu)."""
    assert kernel_tiling() == dict(row_tile=32, key_tile=64, dim_chunk=32, head_batch=32, target_blocks=128)


class _Perturbed:
    """A kernel build that is slightly wrong: the case checks must notice."""

    def __init__(self, kernels):
        self.kernels = kernels

    def visual_score(self, *args, **kwargs):
        (scores,) = self.kernels.visual_score(*args, **kwargs)
        scores = scores.copy()
        scores[len(scores) // 2] *= np.float32(1 + 1e-4)
        return (scores,)

    def token_select(self, *args, **kwargs):
        data, positions, rows = self.kernels.token_select(*args, **kwargs)
        data = data.copy()
        data[0, -1, 0] = np.nextafter(data[0, -1, 0], np.inf)
        return data, positions, rows

    def token_scatter(self, *args, **kwargs):
        (out,) = self.kernels.token_scatter(*args, **kwargs)
        out = out.copy()
        out[0, 0, -1] = -out[0, 0, -1] if out[0, 0, -1] != 0 else 1
        return (out,)


@pytest.mark.parametrize("prefix", ["VisualScore-H2x1-T4096-D8-n2880-visual_and_text-max",
                                    "TokenSelect-T4096-n2880", "TokenScatter-T4096"])
def test_real_size_checks_catch_a_small_error(host_kernels, prefix):
    case = next(c for c in CASES if c.name.startswith(prefix))
    case.run(host_kernels)
    with pytest.raises(AssertionError):
        case.run(_Perturbed(host_kernels))


def test_host_build_is_not_the_cuda_build(host_kernels):
    assert not host_kernels.is_cuda and host_kernels.device_count() == 0


def test_bad_arguments_are_refused_not_launched(host_kernels):
    scores = np.arange(4, dtype=np.float32)
    data = np.zeros((1, 6, 2), np.float32)
    positions = np.arange(6, dtype=np.int64)[None]
    start = np.array([1], np.int64)
    for k in (0, 5):
        with pytest.raises(KernelError, match="bad argument"):
            host_kernels.token_select(scores, start, data, positions, k=k, n_vis=4)
    q = np.zeros((1, 3, 1, 8), np.float32)
    k = np.zeros((1, 2, 10, 8), np.float32)
    with pytest.raises(KernelError, match="bad argument"):  # 3 query heads over 2 kv heads
        host_kernels.visual_score(q, k, np.arange(10)[None], start, n_vis=4, query_rows="last_text",
                                  head_reduction="mean", combine="single", scale=1.0)
    with pytest.raises(KernelError, match="bad argument"):
        host_kernels.visual_score(q[:, :2], k, np.arange(10)[None], start, n_vis=4, query_rows="last_text",
                                  head_reduction="mean", combine="single", scale=1.0,
                                  tiling=dict(row_tile=0, key_tile=1, dim_chunk=1, head_batch=1, target_blocks=1))
    with pytest.raises(KernelError, match="float32 or float16"):
        host_kernels.token_select(scores, start, data.astype(np.float64), positions, k=2, n_vis=4)


def test_out_of_range_vis_start_is_clamped_not_dereferenced(host_kernels):
    """The references raise; a kernel cannot, so it clamps the span into the sequence (memory safety)."""
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(4).astype(np.float32)
    data = rng.standard_normal((1, 6, 3)).astype(np.float32)
    positions = np.arange(6, dtype=np.int64)[None]
    got = host_kernels.token_select(scores, np.array([99], np.int64), data, positions, k=2, n_vis=4)
    want = ops.token_select(scores, np.array([2], np.int64), data, positions, k=2, n_vis=4)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_scatter_skips_rows_outside_the_sequence(host_kernels):
    base = np.ones((1, 4, 2), np.float32)
    updates = np.full((1, 2, 2), 7, np.float32)
    out = host_kernels.token_scatter(base, updates, np.array([1, 9], np.int64))[0]
    np.testing.assert_array_equal(out[0, :, 0], [1, 7, 1, 1])


def test_float16_conversion_is_round_to_nearest_even(host_kernels):
    """Every float16 bit pattern survives the scale-by-one path (half -> float -> half), NaN included."""
    bits = np.arange(2**16, dtype=np.uint16)
    base = bits.view(np.float16).reshape(1, -1, 1)
    out = host_kernels.token_scatter(base, np.zeros((1, 0, 1), np.float16), np.zeros(0, np.int64),
                                     np.ones((1, base.shape[1], 1), np.float16))[0]
    finite = np.isfinite(base)
    np.testing.assert_array_equal(out[finite].view(np.uint16), base[finite].view(np.uint16))
    assert np.isnan(out[np.isnan(base)]).all()
    # products that land between two halves round to even, as NumPy's float16 multiply does
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1, 4096, 1)).astype(np.float16)
    s = rng.uniform(-3, 3, (1, 4096, 1)).astype(np.float16)
    got = host_kernels.token_scatter(a, np.zeros((1, 0, 1), np.float16), np.zeros(0, np.int64), s)[0]
    np.testing.assert_array_equal(got.view(np.uint16), (a * s).view(np.uint16))


def test_visual_score_has_no_sequence_length_limit(host_kernels):
    """The old kernel kept a row of logits in shared memory (seq_len + head_dim <= 12256); now 20k is fine."""
    rng = np.random.default_rng(3)
    seq_len, n_vis = 20_000, 576
    q = rng.standard_normal((1, 2, 1, 8)).astype(np.float16)
    k = rng.standard_normal((1, 1, seq_len, 8)).astype(np.float16)
    positions, start = np.arange(seq_len)[None], np.array([100], np.int64)
    attrs = dict(n_vis=n_vis, query_rows="last_text", head_reduction="mean", combine="single", scale=8 ** -0.5)
    got = host_kernels.visual_score(q, k, positions, start, **attrs)[0]
    np.testing.assert_allclose(got, ops.visual_score(q, k, positions, start, **attrs)[0],
                               rtol=kernel_checks.VISUAL_SCORE_RTOL, atol=kernel_checks.VISUAL_SCORE_ATOL)


def test_visual_score_workspace_leaves_room_for_head_splits(host_kernels):
    lib = host_kernels.lib
    spare = kernel_checks_constants()["SPARE_ROWS"]
    assert lib.mllm_visual_score_workspace(1, 576) == (1 + spare) * 576 * 4
    assert lib.mllm_visual_score_workspace(3000, 2880) == (3000 + spare) * 2880 * 4


def kernel_checks_constants():
    from mllm_deploy.plugins.kernels import header_constants

    return header_constants()


def test_visual_score_cost_script_counts_less_traffic_than_the_per_row_kernel(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "visual_score_cost.py"
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, str(script), "--json", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Jetson AGX Orin" in proc.stdout and "Orin Nano" in proc.stdout
    tiled, per_row = json.loads(out.read_text())["costs"]
    assert tiled["dram"] == per_row["dram"]  # the same compulsory bytes; the reuse differs
    assert tiled["loads"] * 10 < per_row["loads"] and tiled["flops"] < per_row["flops"]
