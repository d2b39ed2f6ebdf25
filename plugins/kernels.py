"""Build and call the routing kernels' C ABI (``plugins/cuda/routing_kernels.h``) through ctypes.

Two builds of one ABI: the CUDA library (``routing_kernels.cu``, built with plain nvcc, no
TensorRT) and the host reference library (``routing_host.cpp``, built with the system C++
compiler) that applies the same per-element rules (``routing_math.h``) in loops. The TensorRT
plugin library (``plugins/CMakeLists.txt``) links the same CUDA code and exports the same ABI, so
:class:`RoutingKernels` can also drive the exact binary TensorRT loads.

The wrapper keeps one code path for both builds: allocate through the library, copy in, launch,
synchronise, copy out. Imports only NumPy and the standard library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mllm_deploy.core.errors import DependencyError, MllmError
from mllm_deploy.plugins.ops import COMBINES, HEAD_REDUCTIONS, QUERY_ROWS

CUDA_DIR = Path(__file__).with_name("cuda")
HEADERS = ("routing_kernels.h", "routing_math.h")
CUDA_SOURCE = "routing_kernels.cu"
HOST_SOURCE = "routing_host.cpp"
# sm_87: Jetson Orin; sm_110: Jetson Thor; sm_80/86/89/90: A100, RTX 30xx/A10, L4/RTX 40xx, H100.
ARCHITECTURES = ("80", "86", "87", "89", "90", "110")
CXX_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-Wall")
DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
STATUS = {0: "ok", 1: "bad argument", 2: "CUDA error"}


class KernelBuildError(MllmError):
    """A compiler is missing or failed on the routing kernels."""


def find_nvcc() -> str | None:
    """nvcc from PATH, $CUDA_HOME or /usr/local/cuda (None when there is none)."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def find_cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def gencode_flags(archs: Sequence[str]) -> list[str]:
    """``-gencode`` per architecture (SASS each), plus PTX of the newest for later GPUs; "native" passes through."""
    if list(archs) == ["native"]:
        return ["-arch=native"]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=int)
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def nvcc_command(nvcc: str, output: Path, archs: Sequence[str], shared: bool) -> list[str]:
    """The nvcc line for the CUDA build: ``shared`` makes the ctypes library, else ``-c`` (compile check)."""
    kind = ["-shared", "-Xcompiler", "-fPIC"] if shared else ["-c", "-Xcompiler", "-fPIC"]
    return [nvcc, "-O3", "-std=c++17", "--threads", "0", *kind, *gencode_flags(archs), "-I", str(CUDA_DIR),
            "-o", str(output), str(CUDA_DIR / CUDA_SOURCE)]


def host_command(cxx: str, output: Path) -> list[str]:
    return [cxx, *CXX_FLAGS, "-shared", "-I", str(CUDA_DIR), "-o", str(output), str(CUDA_DIR / HOST_SOURCE)]


def source_digest(*extra: str) -> str:
    """Hash of the kernel sources and the given build parameters (the cache key of a build)."""
    digest = hashlib.sha256()
    for name in (*HEADERS, CUDA_SOURCE, HOST_SOURCE):
        digest.update(name.encode())
        digest.update((CUDA_DIR / name).read_bytes())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()[:16]


def _cache_root() -> Path:
    root = os.environ.get("MLLM_DEPLOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mllm-deploy")
    return Path(root) / "kernels"


def _run(command: list[str], what: str) -> None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise KernelBuildError(f"{what}: {command[0]} not found") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        raise KernelBuildError(f"{what} failed ({' '.join(command[:2])} ...): " + " | ".join(tail))


def _build_cached(name: str, key: str, make: Callable[[Path], list[str]], what: str, out_dir: Path | None) -> Path:
    target_dir = Path(out_dir) if out_dir is not None else _cache_root() / key
    target = target_dir / name
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".build-") as scratch:
        partial = Path(scratch) / name
        _run(make(partial), what)
        os.replace(partial, target)  # concurrent builders each rename a complete file
    return target


def build_host_library(out_dir: Path | None = None) -> Path:
    """The host reference build as a shared library (cached by source hash)."""
    cxx = find_cxx()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++)")
    return _build_cached("libmllm_routing_host.so", "host-" + source_digest(cxx, *CXX_FLAGS),
                         lambda out: host_command(cxx, out), "host kernel build", out_dir)


def build_cuda_library(archs: Sequence[str] = ("native",), out_dir: Path | None = None) -> Path:
    """The CUDA build as a shared library for ``archs`` (default: the GPUs of this machine)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    return _build_cached("libmllm_routing_cuda.so", "cuda-" + source_digest(nvcc, *archs),
                         lambda out: nvcc_command(nvcc, out, archs, shared=True), "CUDA kernel build", out_dir)


def compile_cuda_objects(out_dir: Path, archs: Sequence[str] = ARCHITECTURES) -> Path:
    """Compile (not link, not run) the CUDA kernels for every target architecture: the CI check."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    output = Path(out_dir) / "routing_kernels.o"
    _run(nvcc_command(nvcc, output, archs, shared=False), f"nvcc for sm_{', sm_'.join(archs)}")
    return output


# ---- the ctypes wrapper -----------------------------------------------------------------------------
_P, _I64, _I32, _F32, _SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_size_t
_SIGNATURES = {
    "mllm_is_cuda_build": ([], _I32),
    "mllm_device_count": ([ctypes.POINTER(_I32)], _I32),
    "mllm_malloc": ([ctypes.POINTER(_P), _SZ], _I32),
    "mllm_free": ([_P], _I32),
    "mllm_memcpy_to_device": ([_P, _P, _SZ], _I32),
    "mllm_memcpy_to_host": ([_P, _P, _SZ], _I32),
    "mllm_synchronize": ([], _I32),
    "mllm_last_error": ([], ctypes.c_char_p),
    "mllm_token_select_workspace": ([_I64], _SZ),
    "mllm_token_select": ([_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I32, _P, _P], _I32),
    "mllm_token_scatter": ([_P, _P, _P, _P, _P, _I64, _I64, _I64, _I32, _P], _I32),
    "mllm_visual_score_workspace": ([_I64, _I64], _SZ),
    "mllm_visual_score": ([_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I32, _I32, _I32, _F32, _I32, _P, _P],
                          _I32),
}
# Exported by the host reference build only: VisualScore with a caller-chosen tiling.
_HOST_ONLY_SIGNATURES = {
    "mllm_visual_score_host_tiled": (_SIGNATURES["mllm_visual_score"][0] + [_I64] * 5, _I32),
}
TILING_FIELDS = ("row_tile", "key_tile", "dim_chunk", "head_batch", "target_blocks")


def header_constants(prefix: str = "MLLM_VISUAL_SCORE_") -> dict[str, int]:
    """Integer ``#define``s of routing_kernels.h starting with ``prefix`` (name without it -> value).

    The VisualScore tiling lives there; benchmarks/visual_score_cost.py reads it from here so its
    estimates follow the kernel.
    """
    found = {}
    for line in (CUDA_DIR / HEADERS[0]).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "#define" and parts[1].startswith(prefix) and parts[2].isdigit():
            found[parts[1][len(prefix):]] = int(parts[2])
    return found


def kernel_tiling() -> dict[str, int]:
    """The VisualScore tiling the CUDA kernel is compiled with (row_tile, key_tile, ...)."""
    constants = header_constants()
    return {field: constants[field.upper()] for field in TILING_FIELDS}


class KernelError(MllmError):
    """A routing kernel call returned an error status."""


@dataclass
class _Buffer:
    ptr: int
    nbytes: int


class RoutingKernels:
    """One loaded build of the C ABI. Calls take and return NumPy arrays (copies through the library)."""

    def __init__(self, library: str | Path):
        try:
            self.lib = ctypes.CDLL(str(library))
        except OSError as exc:
            raise DependencyError(f"cannot load the routing kernel library {library}: {exc}") from None
        for name, (argtypes, restype) in _SIGNATURES.items():
            function = getattr(self.lib, name, None)
            if function is None:
                raise DependencyError(f"{library} does not export {name}; is it a routing kernel library?")
            function.argtypes, function.restype = argtypes, restype
        self.host_tiled = getattr(self.lib, "mllm_visual_score_host_tiled", None)
        if self.host_tiled is not None:
            self.host_tiled.argtypes, self.host_tiled.restype = _HOST_ONLY_SIGNATURES["mllm_visual_score_host_tiled"]
        self.library = Path(library)
        self.is_cuda = bool(self.lib.mllm_is_cuda_build())
        self._live: list[_Buffer] = []

    # -- memory --
    def device_count(self) -> int:
        count = _I32(0)
        self._check(self.lib.mllm_device_count(ctypes.byref(count)), "device count")
        return int(count.value)

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            detail = (self.lib.mllm_last_error() or b"").decode(errors="replace")
            raise KernelError(f"{what}: {STATUS.get(status, status)} ({detail})")

    def alloc(self, nbytes: int) -> _Buffer:
        ptr = _P()
        self._check(self.lib.mllm_malloc(ctypes.byref(ptr), max(int(nbytes), 1)), "allocation")
        buffer = _Buffer(int(ptr.value), int(nbytes))
        self._live.append(buffer)
        return buffer

    def upload(self, array: np.ndarray) -> _Buffer:
        array = np.ascontiguousarray(array)
        buffer = self.alloc(array.nbytes)
        if array.nbytes:
            self._check(self.lib.mllm_memcpy_to_device(buffer.ptr, array.ctypes.data, array.nbytes), "copy in")
        return buffer

    def download(self, buffer: _Buffer, shape: tuple[int, ...], dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if out.nbytes:
            self._check(self.lib.mllm_memcpy_to_host(out.ctypes.data, buffer.ptr, out.nbytes), "copy out")
        return out

    def synchronize(self) -> None:
        self._check(self.lib.mllm_synchronize(), "synchronize")

    def free_all(self) -> None:
        while self._live:
            self.lib.mllm_free(self._live.pop().ptr)

    # -- launches on resident buffers (benchmarks time these) --
    def _dtype(self, array: np.ndarray) -> int:
        if array.dtype not in DTYPES:
            raise KernelError(f"activations must be float32 or float16, got {array.dtype}")
        return DTYPES[array.dtype]

    def prepare_token_select(self, scores, vis_start, data, positions, *, k: int, n_vis: int):
        """(launch, collect): launch() enqueues one TokenSelect; collect() returns the outputs."""
        seq_len, hidden = int(data.shape[1]), int(data.shape[2])
        kept = seq_len - n_vis + k
        dtype = self._dtype(data)
        ins = [self.upload(np.asarray(scores, np.float32)), self.upload(np.asarray(vis_start, np.int64)),
               self.upload(data), self.upload(np.asarray(positions, np.int64))]
        out_data, out_pos, out_rows = (self.alloc(kept * hidden * data.itemsize), self.alloc(kept * 8),
                                       self.alloc(kept * 8))
        workspace = self.alloc(self.lib.mllm_token_select_workspace(n_vis))

        def launch() -> None:
            self._check(self.lib.mllm_token_select(*(b.ptr for b in ins), out_data.ptr, out_pos.ptr, out_rows.ptr,
                                                   seq_len, hidden, n_vis, k, dtype, workspace.ptr, None), "token_select")

        def collect():
            self.synchronize()
            return (self.download(out_data, (1, kept, hidden), data.dtype), self.download(out_pos, (1, kept), np.int64),
                    self.download(out_rows, (kept,), np.int64))

        return launch, collect

    def prepare_token_scatter(self, base, updates, rows, skip_scale=None):
        seq_len, hidden = int(base.shape[1]), int(base.shape[2])
        rows = np.asarray(rows, np.int64).reshape(-1)
        dtype = self._dtype(base)
        ins = [self.upload(base), self.upload(np.asarray(updates, base.dtype)), self.upload(rows)]
        scale = self.upload(np.asarray(skip_scale, base.dtype)) if skip_scale is not None else None
        out = self.alloc(base.nbytes)

        def launch() -> None:
            self._check(self.lib.mllm_token_scatter(*(b.ptr for b in ins), scale.ptr if scale else None, out.ptr,
                                                    seq_len, hidden, rows.size, dtype, None), "token_scatter")

        def collect():
            self.synchronize()
            return (self.download(out, base.shape, base.dtype),)

        return launch, collect

    def prepare_visual_score(self, q, k, positions, vis_start, *, n_vis: int, query_rows: str, head_reduction: str,
                             combine: str, scale: float, tiling: dict[str, int] | None = None):
        """``tiling`` (host build only): {row_tile, key_tile, dim_chunk, head_batch, target_blocks} to use
        instead of the kernel's own (see :func:`kernel_tiling`)."""
        if tiling is not None and self.host_tiled is None:
            raise KernelError(f"{self.library.name} has no mllm_visual_score_host_tiled (host reference build only)")
        _, heads, q_len, head_dim = (int(d) for d in q.shape)
        _, kv_heads, seq_len, _ = (int(d) for d in k.shape)
        dtype = self._dtype(q)
        ins = [self.upload(q), self.upload(np.asarray(k, q.dtype)), self.upload(np.asarray(positions, np.int64)),
               self.upload(np.asarray(vis_start, np.int64))]
        out = self.alloc(n_vis * 4)
        workspace = self.alloc(self.lib.mllm_visual_score_workspace(q_len, n_vis))
        enums = (QUERY_ROWS.index(query_rows), HEAD_REDUCTIONS.index(head_reduction), COMBINES.index(combine))

        def launch() -> None:
            args = (*(b.ptr for b in ins), out.ptr, heads, kv_heads, q_len, seq_len, head_dim, n_vis, *enums,
                    float(scale), dtype, workspace.ptr, None)
            if tiling is None:
                self._check(self.lib.mllm_visual_score(*args), "visual_score")
            else:
                self._check(self.host_tiled(*args, *(int(tiling[f]) for f in TILING_FIELDS)), "visual_score")

        def collect():
            self.synchronize()
            return (self.download(out, (n_vis,), np.float32),)

        return launch, collect

    # -- one-shot calls with the NumPy references' signatures (plugins/ops.py) --
    def _once(self, prepared) -> tuple[np.ndarray, ...]:
        launch, collect = prepared
        try:
            launch()
            return collect()
        finally:
            self.free_all()

    def token_select(self, scores, vis_start, data, positions, *, k: int, n_vis: int, **_plugin_attrs):
        return self._once(self.prepare_token_select(scores, vis_start, data, positions, k=k, n_vis=n_vis))

    def token_scatter(self, base, updates, rows, skip_scale=None, **_plugin_attrs):
        return self._once(self.prepare_token_scatter(base, updates, rows, skip_scale))

    def visual_score(self, q, k, positions, vis_start, *, n_vis: int, query_rows: str, head_reduction: str,
                     combine: str, scale: float, tiling: dict[str, int] | None = None, **_plugin_attrs):
        return self._once(self.prepare_visual_score(q, k, positions, vis_start, n_vis=n_vis, query_rows=query_rows,
                                                    head_reduction=head_reduction, combine=combine, scale=scale,
                                                    tiling=tiling))
