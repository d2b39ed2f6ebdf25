"""The TensorRT plugin library (plugins/) compiled against real TensorRT headers.

CI has no TensorRT, so everything here is skipped unless MLLM_TRT_INCLUDE names an include
directory holding NvInferRuntime.h (several may be given, separated by os.pathsep: one case each).
For each, the project's own CMake builds libmllm_deploy_trt_plugins.so (one CUDA architecture, to
stay fast) and the tests check what it exports and links, then drive the plugins from a small
host-only C++ program: dlopen + getCreators(), never libnvinfer, never the GPU.

    MLLM_TRT_INCLUDE=/opt/trt-10.3/include:/opt/trt-11.1/include python -m pytest tests/test_trt_headers.py

With MLLM_TRT_INCLUDE set, a missing cmake, nvcc, nm or readelf is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"
KERNEL_HEADER = PLUGINS / "cuda" / "routing_kernels.h"
TARGET = "mllm_deploy_trt_plugins"
ENV = "MLLM_TRT_INCLUDE"
CUDA_ARCH = "87"
LOG_TAIL = 40
TIMEOUT_S = 1200


def include_dirs() -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(ENV, "").split(os.pathsep) if p.strip()]


def header_version(include: Path) -> str | None:
    """'major.minor' as NvInferVersion.h declares it (newer headers go through TRT_MAJOR_ENTERPRISE & co)."""
    try:
        text = (include / "NvInferVersion.h").read_text(errors="replace")
    except OSError:
        return None
    defines = dict(re.findall(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(\w+)", text, flags=re.M))

    def resolve(name: str) -> str | None:
        value, seen = defines.get(name), set()
        while value is not None and not value.isdigit() and value not in seen:
            seen.add(value)
            value = defines.get(value)
        return value if value is not None and value.isdigit() else None

    major, minor = resolve("NV_TENSORRT_MAJOR"), resolve("NV_TENSORRT_MINOR")
    return f"{major}.{minor}" if major and minor else None


def c_abi_names() -> list[str]:
    """The functions routing_kernels.h declares with MLLM_API (comments and preprocessor lines dropped)."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", KERNEL_HEADER.read_text(), flags=re.S)
    text = re.sub(r"^[ \t]*#.*$", "", text, flags=re.M)
    return re.findall(r"\bMLLM_API\b[^;(]*?\b(\w+)\s*\(", text)


def host_only_names() -> set[str]:
    """Declarations whose own comment says the CUDA build does not export them (host reference build only)."""
    text = KERNEL_HEADER.read_text()
    documented = re.findall(r"(/\*(?:(?!\*/).)*\*/)\s*MLLM_API\b[^;(]*?\b(\w+)\s*\(", text, flags=re.S)
    return {name for comment, name in documented
            if re.search(r"host reference build only|CUDA build does not export", " ".join(comment.split()), re.I)}


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.is_file() and os.access(fallback, os.X_OK) else None


def _params():
    dirs = include_dirs()
    if not dirs:
        return [pytest.param(None, id="no-headers")]
    return [pytest.param(d, id=f"trt{header_version(d) or 'unknown'}-{i}") for i, d in enumerate(dirs)]


@dataclass
class Build:
    include: Path
    version: str = "?"
    build_dir: Path | None = None
    library: Path | None = None
    cmake: str | None = None
    nvcc: str | None = None
    log: list[str] = field(default_factory=list)
    problem: str | None = None  # why the library could not be built; each test fails with it

    @property
    def label(self) -> str:
        return f"TensorRT {self.version} headers ({self.include})"

    def tail(self, lines: int = LOG_TAIL) -> str:
        return "\n".join("\n".join(self.log).splitlines()[-lines:])

    def run(self, cmd: list[str], cwd: Path | None = None) -> int:
        self.log.append("$ " + " ".join(cmd))
        try:
            proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            self.log.append(f"timed out after {TIMEOUT_S} s: {error.output or ''}")
            return -1
        self.log.append(proc.stdout)
        return proc.returncode

    def require(self) -> None:
        if self.problem:
            pytest.fail(self.problem, pytrace=False)


def _build(include: Path, build_dir: Path) -> Build:
    build = Build(include=include, build_dir=build_dir)
    if not (include / "NvInferRuntime.h").is_file():
        build.problem = f"{ENV}: {include} holds no NvInferRuntime.h"
        return build
    build.version = header_version(include) or "?"
    if build.version == "?":
        build.problem = f"{build.label}: no NV_TENSORRT_MAJOR/MINOR found in NvInferVersion.h"
        return build
    build.cmake, build.nvcc = shutil.which("cmake"), find_nvcc()
    missing = [name for name, path in (("cmake", build.cmake), ("nvcc", build.nvcc)) if path is None]
    missing += [tool for tool in ("nm", "readelf") if shutil.which(tool) is None]
    if missing:
        build.problem = f"{ENV} is set but {', '.join(missing)} not found (nvcc: PATH or /usr/local/cuda/bin)"
        return build
    configure = [build.cmake, "-S", str(PLUGINS), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DTENSORRT_INCLUDE_DIR={include}", f"-DCMAKE_CUDA_COMPILER={build.nvcc}",
                 f"-DCMAKE_CUDA_ARCHITECTURES={CUDA_ARCH}"]
    if build.run(configure) != 0:
        build.problem = f"{build.label}: cmake configure failed\n{build.tail()}"
        return build
    jobs = str(max(1, min(os.cpu_count() or 1, 8)))
    if build.run([build.cmake, "--build", str(build_dir), "--target", TARGET, "--parallel", jobs]) != 0:
        build.problem = f"{build.label}: build of {TARGET} failed\n{build.tail()}"
        return build
    build.library = build_dir / f"lib{TARGET}.so"
    if not build.library.is_file():
        build.problem = f"{build.label}: the build succeeded but {build.library} is missing\n{build.tail()}"
    return build


@pytest.fixture(scope="module", params=_params())
def built(request, tmp_path_factory) -> Build:
    include = request.param
    if include is None:
        pytest.skip(f"{ENV} is unset: point it at a TensorRT include directory (holding NvInferRuntime.h) "
                    "to compile the plugin library against real headers")
    return _build(include, tmp_path_factory.mktemp("trt-plugins-build"))


def _tool_output(build: Build, cmd: list[str]) -> str:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, f"{build.label}: {' '.join(cmd)} failed:\n{proc.stdout}"
    return proc.stdout


def test_plugin_library_builds(built):
    built.require()
    size = built.library.stat().st_size
    assert size > 0, f"{built.label}: empty library\n{built.tail()}"
    print(f"{built.label}: {built.library.name} {size} bytes")


def test_no_compiler_warnings_in_project_sources(built):
    built.require()
    ours = [line for line in "\n".join(built.log).splitlines()
            if re.search(r"plugins/(trt|cuda)/[\w.]+[:(]\d+.*\bwarning\b", line)]
    listed = "\n".join(ours)
    assert not ours, f"{built.label}: warnings in plugins/ sources:\n{listed}\n--- log tail\n{built.tail()}"


def test_exports_entry_points_and_kernel_c_abi(built):
    built.require()
    host_only = host_only_names()
    names = [n for n in c_abi_names() if n not in host_only]
    assert len(names) >= 3 and all(n.startswith("mllm_") for n in names), f"parsed {names} from {KERNEL_HEADER}"
    defined = {}
    for line in _tool_output(built, ["nm", "-D", "--defined-only", str(built.library)]).splitlines():
        parts = line.split()
        if len(parts) >= 3:
            defined[parts[2].split("@")[0]] = parts[1]
    expected = ["getCreators", "setLoggerFinder", "mllm_trt_plugins_tensorrt_major", *names]
    missing = [n for n in expected if n not in defined]
    assert not missing, f"{built.label}: not exported: {missing}\n--- log tail\n{built.tail()}"
    not_code = {n: defined[n] for n in expected if defined[n] not in ("T", "t")}
    assert not not_code, f"{built.label}: exported but not as functions: {not_code}"
    from mllm_deploy.trt.env import plugin_library_tensorrt_major

    # what build-mllm reads before loading the library (11.x changed the logger ABI)
    assert plugin_library_tensorrt_major(built.library) == int(built.version.split(".")[0]), built.label


def test_does_not_link_libnvinfer(built):
    built.require()
    dynamic = _tool_output(built, ["readelf", "-d", str(built.library)])
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert needed, f"{built.label}: readelf printed no NEEDED entries:\n{dynamic}"
    assert not [n for n in needed if "nvinfer" in n], f"{built.label}: NEEDED {needed}"
    undefined = _tool_output(built, ["nm", "-D", "-C", "--undefined-only", str(built.library)])
    from_trt = [line.strip() for line in undefined.splitlines() if "nvinfer1" in line]
    assert not from_trt, f"{built.label}: symbols only libnvinfer could provide: {from_trt}"


# ---- behaviour: drive the built library through the TensorRT interfaces, host only -----------------------
DRIVER_DIR = Path(__file__).with_name("trt_host_check")  # CMakeLists.txt + host_check.cpp


def test_host_driver_exercises_plugins(built, tmp_path):
    """Formats, output types (FP32 ranking scores in FP16 builds), fields and logging, seen from TensorRT's side."""
    built.require()
    shutil.copytree(DRIVER_DIR, tmp_path, dirs_exist_ok=True)
    driver = Build(include=built.include, version=built.version)
    build_dir = tmp_path / "build"
    rc = driver.run([built.cmake, "-S", str(tmp_path), "-B", str(build_dir), f"-DTRT_INCLUDE={built.include}",
                     f"-DCMAKE_CUDA_COMPILER={built.nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={CUDA_ARCH}"])
    if rc == 0:
        rc = driver.run([built.cmake, "--build", str(build_dir)])
    assert rc == 0, f"{built.label}: the host driver did not build\n{driver.tail()}"
    proc = subprocess.run([str(build_dir / "host_check"), str(built.library)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, f"{built.label}: host driver failed (rc {proc.returncode}):\n{proc.stdout}"
    assert "0 failure(s)" in proc.stdout, proc.stdout
