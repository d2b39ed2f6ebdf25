"""The routing kernels (plugins/cuda) against the NumPy references of plugins/ops.py.

CI has no GPU: the CUDA source is compiled (not run) for every target architecture, and the host
reference build of the same C ABI, which applies the very per-element rules of the kernels
(routing_math.h), is run on random inputs. On a GPU machine the CUDA build runs the same cases.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from mllm_deploy.plugins import ops
from mllm_deploy.plugins.kernel_checks import all_cases
from mllm_deploy.plugins.kernels import (ARCHITECTURES, KernelBuildError, KernelError, RoutingKernels,
                                         build_cuda_library, build_host_library, compile_cuda_objects, find_cxx,
                                         find_nvcc, gencode_flags)

CASES = all_cases()


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


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_host_build_matches_numpy_reference(host_kernels, case):
    case.run(host_kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cuda_build_matches_numpy_reference(cuda_kernels, case):
    case.run(cuda_kernels)


def test_case_list_spans_k_dtypes_and_modes():
    names = [c.name for c in CASES]
    for word in ("ties", "special", "float16", "float32", "self_times_cross", "lastq", "gappy", "scaled"):
        assert any(word in n for n in names), word


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
    q = np.zeros((1, 2, 1, 8), np.float32)
    long_k = np.zeros((1, 2, 12_300, 8), np.float32)
    with pytest.raises(KernelError, match="bad argument"):  # beyond the shared-memory row of the GPU kernel
        host_kernels.visual_score(q, long_k, np.arange(12_300)[None], start, n_vis=4, query_rows="last_text",
                                  head_reduction="mean", combine="single", scale=1.0)
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
